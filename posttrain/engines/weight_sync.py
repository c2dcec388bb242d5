"""Trainer side of weight sync: the core's weights, in buckets, into a vLLM engine.

    sync = WeightSync(client, transport, bucket_bytes=256 << 20)
    stats = sync.push(model, args)      # {"seconds", "buckets", "tensors", "bytes"}

The stream is the checkpoint layout vLLM loads from disk (`rollout_tensors`): HF names, the
core's stacked experts split into one tensor per expert (views, not copies), MTP layers left
out (the served model does not run them). `buckets` groups it into runs of at most
`bucket_bytes`; only the bucket in flight is ever copied (dtype cast, shared-memory file), so
a sync never holds more than one bucket beyond the model. `bucket_bytes=0` sends one tensor
at a time.

The control plane is vLLM's weight-transfer protocol (start / update per bucket / finish):
`InProcessClient` for an engine in this process (colocated), `HTTPClient` for a server
started with VLLM_SERVER_DEV_MODE=1. The data plane is the transport: `InProcessTransport`
hands over the tensors themselves, `SharedMemoryTransport` writes each bucket to one file.
The receiving ends are in vllm_receivers.py.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

Named = tuple[str, torch.Tensor]
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def rollout_tensors(model, args) -> Iterator[Named]:
    """(HF name, detached tensor) for every weight the served model holds.

    A sharded trainer (expert parallel / FSDP2) yields whole tensors gathered one at a time, as
    the buckets consume them, so no process ever holds the whole model twice; every process
    must then walk the stream in step (they all sync their engines together)."""
    from posttrain.model.checkpoint import hf_state_dict
    from posttrain.model.parallel import GatheredStateDict, is_sharded

    state = GatheredStateDict(model, to_cpu=False) if is_sharded(model) else None
    for name, t in hf_state_dict(model, args, state):
        m = _LAYER.match(name)
        if m and int(m[1]) >= args.num_hidden_layers:  # MTP: not part of the served model
            continue
        yield name, t.detach()


def buckets(named: Iterable[Named], bucket_bytes: int) -> Iterator[list[Named]]:
    """Consecutive groups of at most `bucket_bytes` (a larger tensor travels alone)."""
    group, size = [], 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if group and size + nbytes > bucket_bytes:
            yield group
            group, size = [], 0
        group.append((name, t))
        size += nbytes
    if group:
        yield group


# ------------------------------------------------------------------ clients
class InProcessClient:
    """vLLM's offline `LLM` in this process."""

    def __init__(self, llm):
        self.llm = llm

    def init(self, init_info: dict) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start(self) -> None:
        self.llm.start_weight_update()

    def update(self, update_info: dict) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish(self) -> None:
        self.llm.finish_weight_update()
        self.llm.reset_prefix_cache()  # cached prefixes hold KV computed with the old weights


class HTTPClient:
    """A vLLM server's weight-transfer routes (present when VLLM_SERVER_DEV_MODE=1)."""

    def __init__(self, base_url: str, timeout: float = 600):
        self.base_url, self.timeout = base_url.rstrip("/"), timeout

    def _post(self, path: str, body: dict | None = None) -> None:
        req = urllib.request.Request(f"{self.base_url}/{path}", data=json.dumps(body or {}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                r.read()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"vLLM server {path}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from e

    def init(self, init_info: dict) -> None:
        self._post("init_weight_transfer_engine", {"init_info": init_info})

    def start(self) -> None:
        self._post("start_weight_update")

    def update(self, update_info: dict) -> None:
        self._post("update_weights", {"update_info": update_info})

    def finish(self) -> None:
        self._post("finish_weight_update")
        self._post("reset_prefix_cache")


# --------------------------------------------------------------- transports
class InProcessTransport:
    """The tensors themselves (backend posttrain_inproc); only for an engine in this process."""

    backend = "posttrain_inproc"

    def pack(self, bucket: list[Named], dtype: torch.dtype | None) -> dict:
        return {"names": [n for n, _ in bucket],
                "tensors": [t if dtype is None else t.to(dtype) for _, t in bucket]}

    def release(self, update_info: dict) -> None:
        update_info["tensors"].clear()


class SharedMemoryTransport:
    """Each bucket is one file of tensors back to back (backend posttrain_shm). /dev/shm keeps
    it in memory; any directory both processes see works."""

    backend = "posttrain_shm"
    ALIGN = 64

    def __init__(self, directory: str | Path | None = None):
        default = "/dev/shm" if Path("/dev/shm").is_dir() else None
        self.directory = Path(directory or default or os.environ.get("TMPDIR", "/tmp"))
        self.prefix = f"posttrain-weights-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.count = 0

    def pack(self, bucket: list[Named], dtype: torch.dtype | None) -> dict:
        offsets, total = [], 0
        for _, t in bucket:
            offsets.append(total)
            nbytes = t.numel() * (dtype.itemsize if dtype is not None else t.element_size())
            total += -(-nbytes // self.ALIGN) * self.ALIGN
        self.count += 1
        path = self.directory / f"{self.prefix}-{self.count}.bin"
        buf = torch.from_file(str(path), shared=True, size=total, dtype=torch.uint8)
        for (_, t), off in zip(bucket, offsets):
            src = (t if dtype is None else t.to(dtype)).contiguous()
            flat = src.view(-1).view(torch.uint8) if src.numel() else src.view(torch.uint8)
            buf[off:off + flat.numel()].copy_(flat)
        del buf  # unmapped; the receiver maps the file itself
        return {"path": str(path), "names": [n for n, _ in bucket],
                "dtype_names": [str(dtype or t.dtype).removeprefix("torch.") for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket], "offsets": offsets, "nbytes": total}

    def release(self, update_info: dict) -> None:
        Path(update_info["path"]).unlink(missing_ok=True)


# --------------------------------------------------------------------- sync
class WeightSync:
    def __init__(self, client, transport, bucket_bytes: int = 256 << 20, dtype: torch.dtype | None = None):
        self.client, self.transport = client, transport
        self.bucket_bytes, self.dtype = bucket_bytes, dtype
        self.client.init({})

    @torch.no_grad()
    def push(self, model, args) -> dict:
        t0 = time.perf_counter()
        n_buckets = n_tensors = n_bytes = 0
        self.client.start()
        for bucket in buckets(rollout_tensors(model, args), self.bucket_bytes):
            info = self.transport.pack(bucket, self.dtype)
            try:
                self.client.update(info)
            finally:
                self.transport.release(info)
            n_buckets += 1
            n_tensors += len(bucket)
            n_bytes += sum(t.numel() * (self.dtype.itemsize if self.dtype else t.element_size()) for _, t in bucket)
        self.client.finish()
        return {"seconds": time.perf_counter() - t0, "buckets": n_buckets, "tensors": n_tensors, "bytes": n_bytes}
