"""vLLM-side receivers for the trainer's weights, plugged into vLLM's weight-transfer API.

vLLM drives every update as start -> update (once per bucket) -> finish. Both receivers
here load checkpoint-format tensors (HF names, one tensor per expert) with vLLM's layerwise
reload: `start` puts each layer back into its checkpoint layout, `update` feeds a bucket
through the model's own `load_weights` (name mapping, expert placement), and `finish` re-runs
the post-load processing that vLLM's MoE and quantised layers do after a normal load (their
weights are repacked into kernel layouts; loading new tensors without that step leaves the
routed experts stale or wrong).

Backends (registered with `register()`, which vLLM's plugin hook calls in every process):
    posttrain_inproc  the tensors themselves travel in the update info; for an engine that
                      lives in the training process (colocated), so nothing is copied twice
    posttrain_shm     a bucket is one file (under /dev/shm by default) holding the tensors
                      back to back; the update info names the file and each tensor's dtype,
                      shape and byte offset; for a vLLM server on the same host without GPUs
GPU-to-GPU transfers use vLLM's own "nccl" backend with the same bucket stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

INPROC = "posttrain_inproc"
SHM = "posttrain_shm"


@dataclass
class NoInitInfo(WeightTransferInitInfo):
    """Neither backend needs a rendezvous."""


@dataclass
class InProcessUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    tensors: list[Any]

    def __post_init__(self):
        if len(self.names) != len(self.tensors):
            raise ValueError(f"{len(self.names)} names for {len(self.tensors)} tensors")


@dataclass
class SharedMemoryUpdateInfo(WeightTransferUpdateInfo):
    path: str
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    offsets: list[int]             # byte offset of each tensor in the file
    nbytes: int = 0                # the file's expected size (a truncated file is an error)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.names)
        if not (len(self.dtype_names) == len(self.shapes) == len(self.offsets) == n):
            raise ValueError("names, dtype_names, shapes and offsets must have one entry per tensor")


class _ExpertRepackWatch:
    """vLLM's MoE processing skips the experts' own repacking on a weight update (it expects
    the layout to be unchanged), but vLLM-CPU's experts prepack into a grouped-GEMM layout: a
    reload leaves plain checkpoint-layout weights where the kernel reads packed ones, and the
    routed experts compute garbage. This watch records which MoE layers were re-processed in
    an update and whether their experts' repack ran; `finish` runs it where it did not."""

    def __init__(self, model):
        from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEExpertsModular

        self.processed, self.repacked, self.restore = [], set(), []
        for layer in model.modules():
            qm = getattr(layer, "quant_method", None)
            experts = getattr(getattr(qm, "moe_kernel", None), "fused_experts", None)
            if experts is None:
                continue
            own = type(experts).process_weights_after_loading
            if own is FusedMoEExpertsModular.process_weights_after_loading:
                continue  # a no-op repack: nothing can go stale
            self._wrap(qm, "process_weights_after_loading", lambda l: self.processed.append(l))
            self._wrap(experts, "process_weights_after_loading", lambda l: self.repacked.add(id(l)))

    def _wrap(self, obj, attr, note):
        original = getattr(obj, attr)

        def wrapped(layer, *a, **k):
            note(layer)
            return original(layer, *a, **k)

        setattr(obj, attr, wrapped)
        self.restore.append((obj, attr))

    def finish(self) -> int:
        for obj, attr in self.restore:
            delattr(obj, attr)  # back to the class's method
        fixed = 0
        for layer in self.processed:
            if id(layer) not in self.repacked:
                layer.quant_method.moe_kernel.fused_experts.process_weights_after_loading(layer)
                fixed += 1
        return fixed


class _LayerwiseReceiver(WeightTransferEngine):
    """start/finish run vLLM's layerwise reload around the buckets."""

    init_info_cls = NoInitInfo
    _watch: _ExpertRepackWatch | None = None

    def init_transfer_engine(self, init_info) -> None:
        pass

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        self._watch = _ExpertRepackWatch(self.model)
        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        if self._watch is not None:
            self._watch.finish()
            self._watch = None

    def _load(self, named) -> None:
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        with disable_mtp_completeness_check():
            self.model.load_weights(weights=named)

    def update_weights(self, update_info) -> None:
        # the base class synchronises an accelerator after each bucket; on CPU there is none
        self.receive_weights(self.parse_update_info(update_info))
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def shutdown(self) -> None:
        pass


class InProcessReceiver(_LayerwiseReceiver):
    update_info_cls = InProcessUpdateInfo

    def receive_weights(self, update_info: InProcessUpdateInfo) -> None:
        device = self.device
        self._load((name, t.to(device, non_blocking=True)) for name, t in zip(update_info.names, update_info.tensors))


class SharedMemoryReceiver(_LayerwiseReceiver):
    update_info_cls = SharedMemoryUpdateInfo

    def receive_weights(self, update_info: SharedMemoryUpdateInfo) -> None:
        import os

        size = os.path.getsize(update_info.path)
        if update_info.nbytes and size != update_info.nbytes:
            raise ValueError(f"{update_info.path}: {size} bytes, expected {update_info.nbytes}")
        # one read-only mapping of the file; each tensor is a view into it, copied by load_weights
        buf = torch.from_file(update_info.path, shared=False, size=size, dtype=torch.uint8)

        def tensors():
            for name, dtype_name, shape, off in zip(update_info.names, update_info.dtype_names,
                                                    update_info.shapes, update_info.offsets):
                dtype = getattr(torch, dtype_name)
                n = dtype.itemsize
                for s in shape:
                    n *= s
                yield name, buf[off:off + n].view(dtype).view(shape).to(self.device)

        self._load(tensors())


_REGISTERED = False


def register() -> None:
    """Register both backends with vLLM (idempotent). vLLM calls this through the
    `vllm.general_plugins` entry point in every process it starts."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    for name, cls in ((INPROC, InProcessReceiver), (SHM, SharedMemoryReceiver)):
        if name not in WeightTransferEngineFactory._registry:
            WeightTransferEngineFactory.register_engine(name, cls)
    _REGISTERED = True
