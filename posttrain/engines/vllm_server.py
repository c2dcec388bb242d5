"""A vLLM server for RL rollouts, started and stopped by us, that takes new weights.

    engine = VLLMServerEngine(checkpoint, tokenizer, port=None)   # launches `vllm serve`
    engine.generate(prompts, sampling)                            # /v1/completions, token ids in and out
    engine.load_weights(model, args, bucket_bytes)                # weight_sync.py over HTTP + shared memory
    engine.close()

The server runs in its own process (its own interpreter, e.g. another virtualenv, via
`python=`), with VLLM_SERVER_DEV_MODE=1 for vLLM's weight-transfer routes and the
`posttrain_shm` receiver (vllm_receivers.py, registered through our `vllm.general_plugins`
entry point, so posttrain must be installed where the server runs). Prompts are rendered to
token ids here with the same chat template as every other engine, and each sample is one
request with its own seed, as in VLLMEngine, so samples do not depend on batching.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .base import (Engine, EngineError, Prompt, Sample, SamplingConfig, refuse_routed_experts, render_prompt,
                   sample_rows)
from .openai_engine import optional_sampling_fields

SERVED_NAME = "policy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """`vllm serve` as a child process; `url` once healthy. The log goes to `log_path`."""

    def __init__(self, model: str | Path, port: int | None = None, dtype: str = "auto", max_model_len: int = 2048,
                 kv_cache_gb: float | None = None, enforce_eager: bool = True, python: str | None = None,
                 extra_args: list[str] | None = None, log_path: str | Path | None = None,
                 startup_timeout_s: float = 600.0):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", dtype, "--max-model-len", str(max_model_len), "--seed", "0",
               "--weight-transfer-config", json.dumps({"backend": "posttrain_shm"}),
               "--logprobs-mode", "processed_logprobs"]
        if enforce_eager:
            cmd.append("--enforce-eager")
        if kv_cache_gb:
            cmd += ["--kv-cache-memory-bytes", str(int(kv_cache_gb * (1 << 30)))]
        cmd += list(extra_args or [])
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_healthy(startup_timeout_s)
        except BaseException:
            self.close()
            raise

    def _log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EngineError(f"vLLM server exited with code {self.proc.returncode}; log {self.log_path}:\n"
                                  f"{self._log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise EngineError(f"vLLM server not healthy after {timeout_s:.0f}s; log {self.log_path}:\n{self._log_tail()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class VLLMServerEngine(Engine):
    name = "vllm-server"

    def __init__(self, model: str | Path, tokenizer, concurrency: int = 64, dtype: str = "auto",
                 server: VLLMServer | None = None, shm_dir: str | None = None, **server_kwargs):
        from .openai_engine import OpenAIEngine

        self.server = server or VLLMServer(model, dtype=dtype, **server_kwargs)
        self.tokenizer, self.model_name, self.dtype = tokenizer, str(model), dtype
        self.client = OpenAIEngine(self.server.url, SERVED_NAME, concurrency=concurrency, max_retries=2)
        self.concurrency = concurrency
        self.shm_dir = shm_dir
        self._sync = None

    def describe(self) -> dict:
        return {"engine": self.name, "model": self.model_name, "url": self.server.url}

    def generate(self, prompts: list[Prompt], sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> list[list[Sample]]:
        sampling.validate()
        refuse_routed_experts(self.name, sampling)
        rows = sample_rows(prompts, sampling, seeds, lambda p: render_prompt(self.tokenizer, p))

        def one(row) -> Sample:
            _, ids, seed = row
            body = {"model": SERVED_NAME, "prompt": ids, "max_tokens": sampling.max_tokens,
                    "temperature": sampling.temperature, "top_p": sampling.top_p, "return_token_ids": True,
                    "skip_special_tokens": True, **optional_sampling_fields(sampling)}
            if sampling.temperature > 0:
                body["seed"] = seed % (1 << 63)
            if sampling.logprobs:
                body["logprobs"] = 0
            choice = self.client._post("/completions", body)["choices"][0]
            token_ids = choice.get("token_ids")
            if token_ids is None:
                raise EngineError("the server returned no token_ids (needs a vLLM with return_token_ids)")
            logprobs = None
            if sampling.logprobs:
                logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
            finish = "length" if choice.get("finish_reason") == "length" else "stop"
            return Sample(choice.get("text") or "", list(token_ids), finish, logprobs)

        with ThreadPoolExecutor(self.concurrency) as pool:
            samples = list(pool.map(one, rows))
        out: list[list[Sample]] = [[] for _ in prompts]
        for (i, _, _), s in zip(rows, samples):
            out[i].append(s)
        return out

    def load_weights(self, model, args, bucket_bytes: int = 256 << 20) -> dict:
        import torch

        from .weight_sync import HTTPClient, SharedMemoryTransport, WeightSync

        if self._sync is None or self._sync.bucket_bytes != bucket_bytes:
            dtype = None if self.dtype == "auto" else getattr(torch, self.dtype)
            self._sync = WeightSync(HTTPClient(self.server.url), SharedMemoryTransport(self.shm_dir), bucket_bytes, dtype)
        return self._sync.push(model, args)

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(token t | tokens < t) for t >= 1 (prompt log-probs of each sequence)."""
        def one(seq):
            body = {"model": SERVED_NAME, "prompt": list(seq), "max_tokens": 1, "temperature": 0,
                    "prompt_logprobs": 0}
            choice = self.client._post("/completions", body)["choices"][0]
            steps = choice["prompt_logprobs"][1:]
            return [step[str(tok)]["logprob"] for step, tok in zip(steps, seq[1:])]

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, sequences))

    def sleep(self) -> None:   # a separate server keeps its memory; nothing to free here
        pass

    def wake_up(self, tags=None) -> None:
        pass

    def close(self) -> None:
        self.server.close()
