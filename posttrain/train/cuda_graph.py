"""One micro-batch's forward + backward captured once as a CUDA graph, then replayed.

An eager training step issues a few thousand kernels, and with FP8 (quantisations around
every GEMM) the CPU takes longer to issue them than the GPU takes to run them: on an H100 the
V3-shaped benchmark step issued for 145 ms against 94 ms of GPU work. Replaying a captured
graph issues the whole micro-batch in one call.

What it needs, and how the loop provides it:

* fixed shapes: packed SFT batches are [batch_size, max_length] every time. A micro-batch of
  another signature (shapes, dtypes, the bound on packed sequences) runs eagerly, with one
  warning, so nothing is lost;
* no host sync inside forward or backward: the loss function returns tensors (the loop reads
  them after the replay) and packed segments come as `RoutingSegments` worked out on the CPU
  batch. A capture that meets a sync fails; the loop then says why and stays eager;
* gradients that stay where they are: every trainable parameter holds a .grad tensor before
  the capture, and the loop zeroes them in place instead of setting them to None, so the
  captured backward accumulates into the same memory on every replay (gradient accumulation
  works as eagerly);
* warm-up first: the first micro-batches run eagerly (Triton autotuning, cuBLAS workspaces),
  the last of them on a side stream, as torch's capture requires.

Inputs are copied into the captured batch's tensors before each replay; outputs (loss and
metrics) are the captured graph's own tensors, overwritten by the next replay.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch

from posttrain.model.moe import RoutingSegments

WARMUP_MICRO_BATCHES = 3


def batch_signature(batch: dict) -> tuple:
    """What must match for a replay: each tensor's shape and dtype, each RoutingSegments' bound,
    every other value as it is."""
    out = []
    for key in sorted(batch):
        v = batch[key]
        if torch.is_tensor(v):
            out.append((key, tuple(v.shape), v.dtype))
        elif isinstance(v, RoutingSegments):
            out.append((key, tuple(v.seq_N.shape), v.num_sequences))
        else:
            out.append((key, repr(v)))
    return tuple(out)


def _static_copy(batch: dict) -> dict:
    return {k: (v.clone() if torch.is_tensor(v) else
                RoutingSegments(v.seq_N.clone(), v.num_sequences) if isinstance(v, RoutingSegments) else v)
            for k, v in batch.items()}


def _copy_into(static: dict, batch: dict) -> None:
    for k, v in batch.items():
        if torch.is_tensor(v):
            static[k].copy_(v, non_blocking=True)
        elif isinstance(v, RoutingSegments):
            static[k].seq_N.copy_(v.seq_N, non_blocking=True)


def cuda_capture(graph, fn: Callable[[], tuple]) -> tuple:
    """Record fn's kernels into graph (running nothing); its outputs are the graph's tensors."""
    with torch.cuda.graph(graph):
        return fn()


class MicroBatchGraph:
    """Calls `step(batch) -> (loss, metrics)` (forward, and backward into .grad) eagerly for the
    first micro-batches, then captures it for the next one and replays it for every micro-batch
    of the same signature.

    params: the trainable parameters, given a zero .grad before the capture if they have none.
    graph_factory / capture: torch.cuda.CUDAGraph and `cuda_capture`, replaceable for tests.
    """

    def __init__(self, step: Callable[[dict], tuple[torch.Tensor, dict]], params: Iterable[torch.nn.Parameter],
                 warmup: int = WARMUP_MICRO_BATCHES, graph_factory=None, capture=None):
        self.step = step
        self.params = [p for p in params if p.requires_grad]
        self.warmup = warmup
        self.graph_factory = graph_factory or torch.cuda.CUDAGraph
        self.capture = capture or cuda_capture
        self.side_stream = None
        self.graph = None
        self.signature = None
        self.inputs: dict = {}
        self.outputs: tuple | None = None
        self.calls = 0
        self.replays = 0
        self.failed: str | None = None  # why capture failed: the run stays eager
        self._warned_shape = False

    def __call__(self, batch: dict) -> tuple[torch.Tensor, dict]:
        self.calls += 1
        if self.failed is not None:
            return self.step(batch)
        if self.graph is not None:
            if batch_signature(batch) != self.signature:
                if not self._warned_shape:
                    warnings.warn("train.cuda_graphs: a micro-batch's shapes differ from the captured one's "
                                  "(pack SFT data to max_length for fixed shapes); such micro-batches run eagerly",
                                  stacklevel=2)
                    self._warned_shape = True
                return self.step(batch)
            _copy_into(self.inputs, batch)
            self.graph.replay()
            self.replays += 1
            return self.outputs
        if self.calls < self.warmup:
            return self.step(batch)
        if self.calls == self.warmup:  # the last warm-up on a side stream, as capture asks
            return self._on_side_stream(batch)
        return self._capture(batch)

    def _on_side_stream(self, batch: dict):
        if not torch.cuda.is_available():  # tests on CPU, with a stand-in graph
            return self.step(batch)
        if self.side_stream is None:
            self.side_stream = torch.cuda.Stream()
        # blocks cached for one stream (or pool) serve no other: hand the main stream's back first,
        # or the side stream's warm-up and then the graph's pool would each hold a step's activations
        torch.cuda.empty_cache()
        self.side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side_stream):
            out = self.step(batch)
        torch.cuda.current_stream().wait_stream(self.side_stream)
        return out

    def _capture(self, batch: dict):
        for p in self.params:  # the captured backward must accumulate into memory that stays
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.inputs = _static_copy(batch)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # see _on_side_stream
        graph = self.graph_factory()
        try:
            outputs = self.capture(graph, lambda: self.step(self.inputs))
        except Exception as exc:  # a host sync or an op that cannot be captured: stay eager
            self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            warnings.warn(f"train.cuda_graphs: capturing the micro-batch failed ({self.failed}); "
                          "training goes on eagerly", stacklevel=3)
            self.inputs = {}
            return self.step(batch)
        self.graph, self.outputs, self.signature = graph, outputs, batch_signature(batch)
        graph.replay()  # capturing ran nothing: this micro-batch is computed now
        self.replays += 1
        return outputs
