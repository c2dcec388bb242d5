"""Any OpenAI-compatible HTTP endpoint (vLLM / SGLang servers, hosted APIs).

Chat-message prompts go to /v1/chat/completions, string prompts to /v1/completions. Requests
run `concurrency` at a time, are paced by `requests_per_s` (a token bucket shared by all
threads), and are retried on connection errors, timeouts, 408/409/429 and 5xx with
exponential backoff and jitter (a server's Retry-After is honoured). A server that returns
fewer than n choices is asked again for the rest. Every prompt gets exactly its n samples,
in order, or the call raises after the retries are spent. Only the standard library is used.

Log-probs are the server's: a vLLM server reports those of the distribution it sampled from
(as the other engines do) only when started with `--logprobs-mode processed_logprobs`.
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from .base import (Engine, EngineError, Prompt, Sample, SamplingConfig, refuse_routed_experts, resolve_seeds,
                   sample_seed)

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


def optional_sampling_fields(sampling: SamplingConfig) -> dict:
    """The OpenAI-compatible request fields that are sent only when set."""
    body: dict = {}
    if sampling.top_k:
        body["top_k"] = sampling.top_k
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if sampling.stop_token_ids:
        body["stop_token_ids"] = list(sampling.stop_token_ids)
    return body


class EngineRequestError(EngineError):
    """A request that still failed after every retry."""


class _RateLimiter:
    def __init__(self, per_s: float | None):
        self.interval = 1.0 / per_s if per_s else 0.0
        self.next_at = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            at = max(now, self.next_at)
            self.next_at = at + self.interval
        if at > now:
            time.sleep(at - now)


class OpenAIEngine(Engine):
    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None, concurrency: int = 8,
                 requests_per_s: float | None = None, max_retries: int = 6, backoff_s: float = 0.5,
                 timeout_s: float = 600.0, tokenizer=None, extra_body: dict | None = None):
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.model, self.api_key = model, api_key
        self.concurrency, self.max_retries, self.backoff_s, self.timeout_s = concurrency, max_retries, backoff_s, timeout_s
        self.tokenizer = tokenizer  # token ids of the returned text, where the server gives none
        self.extra_body = extra_body or {}
        self._limiter = _RateLimiter(requests_per_s)
        self.stats = {"requests": 0, "retries": 0}
        self._stats_lock = threading.Lock()

    def describe(self) -> dict:
        return {"engine": self.name, "model": self.model, "base_url": self.base_url}

    # ------------------------------------------------------------------ http
    def _post(self, path: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            self._limiter.wait()
            with self._stats_lock:
                self.stats["requests"] += 1
                self.stats["retries"] += attempt > 0
            retry_after = None
            try:
                req = urllib.request.Request(self.base_url + path, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}"
                if e.code not in RETRY_STATUS:
                    raise EngineRequestError(f"{path}: {last}") from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
                last = f"{type(e).__name__}: {e}"
            if attempt < self.max_retries:
                delay = self.backoff_s * 2 ** attempt * (1 + random.random())
                if retry_after:
                    try:
                        delay = max(delay, float(retry_after))
                    except ValueError:
                        pass
                time.sleep(min(delay, 60.0))
        raise EngineRequestError(f"{path}: gave up after {self.max_retries + 1} attempts; last error {last}")

    # -------------------------------------------------------------- generate
    def _body(self, prompt: Prompt, sampling: SamplingConfig, n: int, seed: int) -> tuple[str, dict]:
        body = {"model": self.model, "n": n, "max_tokens": sampling.max_tokens, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "seed": seed, **optional_sampling_fields(sampling), **self.extra_body}
        if isinstance(prompt, str):
            body["prompt"] = prompt
            if sampling.logprobs:
                body["logprobs"] = 1
            return "/completions", body
        body["messages"] = prompt
        if sampling.logprobs:
            body["logprobs"] = True
        return "/chat/completions", body

    def _choice(self, choice: dict, chat: bool) -> Sample:
        text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
        text = text or ""
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        logprobs = None
        lp = choice.get("logprobs")
        if lp:
            if chat and lp.get("content") is not None:
                logprobs = [t.get("logprob") for t in lp["content"]]
            elif lp.get("token_logprobs") is not None:
                logprobs = lp["token_logprobs"]
        ids = choice.get("token_ids")  # vLLM's servers return them when asked (extra_body return_token_ids)
        if not (isinstance(ids, list) and all(isinstance(t, int) for t in ids)):
            if self.tokenizer is None:
                raise EngineRequestError(
                    "the server returned no token ids and this engine has no tokenizer, so the completions' "
                    "token ids (their lengths, for filters and length rewards) are unknown: pass the served "
                    "model's tokenizer (--tokenizer), or ask a vLLM server for them (return_token_ids)")
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return Sample(text, list(ids), finish, logprobs)

    def _one_prompt(self, prompt: Prompt, sampling: SamplingConfig, seed: int) -> list[Sample]:
        samples: list[Sample] = []
        round_ = 0
        while len(samples) < sampling.n:
            path, body = self._body(prompt, sampling, sampling.n - len(samples), sample_seed(seed, round_))
            reply = self._post(path, body)
            choices = sorted(reply.get("choices") or [], key=lambda c: c.get("index", 0))
            if not choices:
                raise EngineRequestError(f"{path}: reply without choices: {str(reply)[:200]}")
            samples += [self._choice(c, path == "/chat/completions") for c in choices]
            round_ += 1
        return samples[: sampling.n]

    def generate(self, prompts: list[Prompt], sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> list[list[Sample]]:
        sampling.validate()
        refuse_routed_experts(self.name, sampling)
        seeds = resolve_seeds(sampling, len(prompts), seeds)
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda a: self._one_prompt(a[0], sampling, a[1]), zip(prompts, seeds)))
