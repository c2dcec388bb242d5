"""The rollout engine of an RL run, kept holding the policy's current weights.

    torch        the core's own KV-cache sampler on the training weights (no copy, no sync);
                 a sharded policy cannot generate on its own (every forward is collective and
                 rollouts differ in length per process), so it samples from a whole copy,
                 refreshed from the gathered weights like a vLLM engine
    vllm         vLLM colocated in this process: before each rollout it is woken weights first,
                 given the new weights in buckets (engines/weight_sync.py), then its KV cache;
                 after the rollout it sleeps while the trainer runs (GPU; a no-op on vLLM-CPU)
    vllm-server  a vLLM server this run launched, fed new weights over HTTP + shared memory
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

VLLM_ENGINES = ("vllm", "vllm-server")


class PolicyEngine:
    def __init__(self, kind: str, model: torch.nn.Module, args, tokenizer, model_path: str,
                 whole_copy: torch.nn.Module | None, vllm_options, seed: int, log_dir: Path,
                 capture_routing: bool = False):
        """whole_copy: for a sharded policy and the torch engine, an unsharded copy of the model
        made before sharding (on the training device), which the engine samples from."""
        self.kind, self.model, self.args = kind, model, args
        self.bucket_bytes = int(vllm_options.bucket_mb * (1 << 20))
        self.copy = whole_copy.eval().requires_grad_(False) if whole_copy is not None else None
        if kind == "torch":
            from posttrain.engines.torch_engine import TorchEngine

            self.engine = TorchEngine(self.copy if self.copy is not None else model, tokenizer, model_name=model_path)
        elif kind == "vllm":
            from posttrain.engines.vllm_engine import VLLMEngine

            v = vllm_options
            self.engine = VLLMEngine(model_path, dtype=v.dtype, max_model_len=v.max_model_len, seed=seed,
                                     enforce_eager=v.enforce_eager, gpu_memory_utilization=v.gpu_memory_utilization,
                                     colocated=True, kv_cache_gb=v.kv_cache_gb, capture_routing=capture_routing)
        elif kind == "vllm-server":
            from posttrain.engines.vllm_server import VLLMServerEngine

            v = vllm_options
            log_dir.mkdir(parents=True, exist_ok=True)
            self.engine = VLLMServerEngine(model_path, tokenizer, dtype=v.dtype, max_model_len=v.max_model_len,
                                           kv_cache_gb=v.kv_cache_gb, enforce_eager=v.enforce_eager, python=v.python,
                                           log_path=log_dir / "vllm-server.log")
        else:
            raise ValueError(f"unknown rollout engine {kind!r}")
        self.version = None        # the trainer step whose weights the engine holds (None: unknown)
        self.awake = True
        self.sync_s = 0.0          # weight-sync seconds since the last `take_sync_seconds`

    @property
    def name(self) -> str:
        return self.engine.name

    def ready(self, step: int) -> None:
        """Make the engine sample from the weights of trainer step `step`."""
        if self.copy is not None and self.version != step:
            from posttrain.model.parallel import GatheredStateDict

            t0 = time.perf_counter()
            target = self.copy.state_dict()
            with torch.no_grad():
                for name, t in GatheredStateDict(self.model, to_cpu=False).items():
                    target[name].copy_(t)
            self.sync_s += time.perf_counter() - t0
        if self.kind in VLLM_ENGINES:
            if not self.awake:
                self.engine.wake_up(["weights"])
            if self.version != step:
                self.sync_s += self.engine.load_weights(self.model, self.args, bucket_bytes=self.bucket_bytes)["seconds"]
            if not self.awake:
                self.engine.wake_up(["kv_cache"])
                self.awake = True
        self.version = step

    def rest(self) -> None:
        """Free the accelerator for training (vLLM sleeps; nothing for the torch engine)."""
        if self.kind in VLLM_ENGINES and self.awake:
            self.engine.sleep()
            self.awake = False

    def take_sync_seconds(self) -> float:
        s, self.sync_s = self.sync_s, 0.0
        return s

    def close(self) -> None:
        if self.kind == "vllm-server":
            self.engine.close()
