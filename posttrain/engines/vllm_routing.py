"""The experts vLLM routed each token to, for routing replay (R3), where vLLM's own
`enable_return_routed_experts` cannot run: it needs Model Runner V2 (Triton kernels) and prefix
caching, neither of which vLLM-CPU has. Needs the engine core in this process.

Three hooks, all on vLLM's objects in this process:
  * each MoE layer's router gets a capture function (`BaseRouter.set_capture_fn`, vLLM's own
    hook): with each step's top-k expert ids [tokens, K], before any expert-placement mapping,
    it copies them into one buffer [max tokens per step, MoE layers, K];
  * the model runner's `_model_forward` is wrapped: at that point its input batch holds the
    step's request order and each request's rows (`query_start_loc`), and `positions` each
    row's place in its sequence. The wrapper marks the rows unwritten (-1), runs the step,
    checks every MoE layer wrote them, and files them per request by position;
  * the output processor's `add_request` is wrapped to learn the engine's internal id of each
    (request, sample index).

A request's rows are laid out by position, later writes winning (recomputation after a
preemption), and cut to prompt + generated - 1 tokens (the last token is never fed back).
Chunked prefill, batch reordering and preemption are covered; a position no step computed
(a prefix-cache hit) is an error, so prefix caching must be off. With torch.compile the hook
must be in place before vLLM traces the model (`install_at_load`, before the engine starts).
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial

import numpy as np
import torch


def _write(buf: torch.Tensor, slot: int, topk_ids: torch.Tensor) -> None:
    """The router's capture function: tensor ops only, so torch.compile can trace it."""
    buf[: topk_ids.shape[0], slot].copy_(topk_ids)


class RoutingCapture:
    """Installed on a model runner (worker side): the routing of every request it runs."""

    def __init__(self, runner):
        from vllm.model_executor.layers.fused_moe.layer import MoERunner
        from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

        self.runner = runner
        moes = sorted((m for m in runner.get_model().modules() if isinstance(m, MoERunner)), key=lambda m: m.layer_id)
        if not moes:
            raise ValueError("the model has no MoE layers: there is no routing to capture")
        for m in moes:
            if m.is_monolithic or not isinstance(m.router, BaseRouter):
                raise ValueError(f"{m.layer_name}: this MoE kernel's router has no capture hook")
        self.layers, self.top_k = len(moes), moes[0].router.top_k
        self.buf = torch.full((runner.max_num_tokens, self.layers, self.top_k), -1, dtype=torch.int32,
                              device=runner.device)
        for slot, m in enumerate(moes):
            m.router.set_capture_fn(partial(_write, self.buf, slot))
        self.rows: dict[str, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
        forward = runner._model_forward

        def _model_forward(*args, **kwargs):
            n = int(runner.query_start_loc.np[runner.input_batch.num_reqs])
            if n > self.buf.shape[0]:
                raise RuntimeError(f"a step of {n} tokens exceeds the routing buffer ({self.buf.shape[0]})")
            self.buf[:n].fill_(-1)
            out = forward(*args, **kwargs)
            self._file(n, kwargs["positions"] if "positions" in kwargs else args[1])
            return out

        runner._model_forward = _model_forward   # an instance attribute shadows the method

    def _file(self, n: int, positions: torch.Tensor) -> None:
        r = self.runner
        num_reqs = r.input_batch.num_reqs
        bounds = r.query_start_loc.np[:num_reqs + 1].astype(np.int64)
        if positions.dim() != 1:
            # DeepSeek-V3 models have one position per token; M-RoPE (multimodal) models do not
            raise ValueError("routing capture needs one position per token; this model's positions are "
                             f"{positions.dim()}-dimensional (M-RoPE), which routing replay does not support")
        pos = positions[:n].to("cpu").numpy().astype(np.int64)
        ids = self.buf[:n].to("cpu", torch.int16).numpy()
        if (ids < 0).any():
            raise RuntimeError("an MoE layer did not report its routing (was the model compiled before the "
                               "capture was installed? use RoutingCapture.install_at_load)")
        for i, rid in enumerate(r.input_batch.req_ids[:num_reqs]):
            s, e = bounds[i], bounds[i + 1]
            if e > s:
                self.rows[rid].append((pos[s:e].copy(), ids[s:e]))

    def pop(self, request_id: str, length: int) -> np.ndarray:
        """[length, MoE layers, K] int16 for an engine-internal request id."""
        out = np.full((length, self.layers, self.top_k), -1, dtype=np.int16)
        for pos, ids in self.rows.pop(request_id, []):
            keep = pos < length
            out[pos[keep]] = ids[keep]
        missing = np.flatnonzero((out < 0).any(axis=(1, 2)))
        if missing.size:
            raise RuntimeError(f"no routing for positions {missing[:8].tolist()} of a request: a position no "
                               "step computed (prefix caching must be off)")
        return out

    def clear(self) -> None:
        self.rows.clear()

    @staticmethod
    def install_at_load() -> None:
        """Install on every CPU model runner right after its model loads, before vLLM's warm-up
        compiles it (needed with torch.compile, whose graph keeps the capture function it saw)."""
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        if getattr(CPUModelRunner.load_model, "_routing_capture", False):
            return
        load = CPUModelRunner.load_model

        def load_model(self, *args, **kwargs):
            load(self, *args, **kwargs)
            self._routing_capture = RoutingCapture(self)

        load_model._routing_capture = True
        CPUModelRunner.load_model = load_model


class RoutedRequests:
    """Engine side: which internal request id each (request, sample index) got, and the
    capture of the in-process worker."""

    def __init__(self, llm):
        from vllm.v1.engine.core_client import InprocClient

        if not isinstance(llm.llm_engine.engine_core, InprocClient):
            raise RuntimeError("routing capture needs the vLLM engine core in this process "
                               "(VLLM_ENABLE_V1_MULTIPROCESSING=0)")
        self.capture: RoutingCapture = llm.collective_rpc(
            lambda worker: getattr(worker.model_runner, "_routing_capture", None)
            or RoutingCapture(worker.model_runner))[0]
        self.internal: dict[tuple[str, int], str] = {}
        processor = llm.llm_engine.output_processor
        add = processor.add_request

        def add_request(request, prompt, parent_req=None, request_index=0, *args, **kwargs):
            self.internal[(request.external_req_id, request_index)] = request.request_id
            return add(request, prompt, parent_req, request_index, *args, **kwargs)

        processor.add_request = add_request

    def routed(self, request_id: str, index: int, length: int) -> np.ndarray:
        return self.capture.pop(self.internal.pop((request_id, index)), length)

    def clear(self) -> None:
        self.internal.clear()
        self.capture.clear()
