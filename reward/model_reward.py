"""A trained reward model as a reward function (TRL's signature), in-process or over HTTP.

    rm = reward.get("model", path="runs/rm/final")             # loads the checkpoint once
    rm(prompts, completions)                                   # -> list[float], batched
    remote = reward.get("http", url="http://host:8010/score")  # served by `posttrain rm serve`

Scores are read at the last token of prompt + completion rendered with the model's chat
template. Conversations longer than the model's `max_length` lose their oldest tokens (after
bos) so the completion, where the score is read, stays whole.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import torch

META_FILE = "reward_model.json"


def _messages(prompt, completion) -> list[dict]:
    if prompt is None:
        head = []
    elif isinstance(prompt, str):
        head = [{"role": "user", "content": prompt}]
    else:
        head = list(prompt)
    if isinstance(completion, str):
        tail = [{"role": "assistant", "content": completion}]
    else:
        tail = list(completion)
    return head + tail


class RewardModelScorer:
    """Batched scoring with a checkpoint that has the scalar head (`score.weight`)."""

    def __init__(self, path: str | Path | None = None, batch_size: int = 16, device: str | None = None,
                 dtype: torch.dtype = torch.float32, max_length: int | None = None, model=None, tokenizer=None):
        """From a checkpoint `path`, or from an in-memory `model` + `tokenizer`."""
        from posttrain.model import load_checkpoint

        if path is None and (model is None or tokenizer is None):
            raise ValueError("give a checkpoint path, or both model and tokenizer")
        path = Path(path) if path is not None else None
        if model is None:
            from posttrain.model.checkpoint import CheckpointError, has_tensor

            if not (path / "config.json").exists():
                raise CheckpointError(f"{path} is not a checkpoint directory (no config.json)")
            if not has_tensor(path, "score.weight"):  # a random head would score by chance, silently
                raise CheckpointError(f"{path} has no trained reward head (score.weight): it is not a reward model; "
                                      "train one with `posttrain rm train` and point at its final/ directory")
            model, _ = load_checkpoint(path, dtype=dtype, scalar_head=True)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path))
        meta = json.loads((path / META_FILE).read_text()) if path and (path / META_FILE).exists() else {}
        self.max_length = max_length or meta.get("max_length") or model.args.max_position_embeddings
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tokenizer, self.batch_size = tokenizer, batch_size
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id

    def encode(self, messages: list[dict]) -> list[int]:
        ids = list(self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        if len(ids) > self.max_length:
            keep_first = ids[:1] == [self.tokenizer.bos_token_id]
            ids = (ids[:1] if keep_first else []) + ids[len(ids) - self.max_length + keep_first:]
        return ids

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        """One score per token sequence; batches are formed by length so padding stays small."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        scores = [0.0] * len(sequences)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            T = max(len(sequences[i]) for i in chunk)
            ids = torch.full((len(chunk), T), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), T), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, :len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, :len(sequences[i])] = 1
            values = self.model.score_sequences(ids.to(self.device), mask.to(self.device)).tolist()
            for row, i in enumerate(chunk):
                scores[i] = values[row]
        return scores

    def score_conversations(self, conversations: list[list[dict]]) -> list[float]:
        return self.score_ids([self.encode(c) for c in conversations])


class ModelReward:
    """reward(prompts, completions, **columns) -> list[float] from a local reward model."""

    def __init__(self, path: str | Path, batch_size: int = 16, device: str | None = None, **kwargs):
        self.scorer = RewardModelScorer(path, batch_size=batch_size, device=device, **kwargs)
        self.__name__ = "reward_model"

    def __call__(self, prompts=None, completions=None, **columns) -> list[float]:
        prompts = prompts if prompts is not None else [None] * len(completions)
        return self.scorer.score_conversations([_messages(p, c) for p, c in zip(prompts, completions)])


class HTTPReward:
    """reward(prompts, completions) scored by a server (`posttrain rm serve`, or anything that
    answers POST {"prompts": [...], "completions": [...]} with {"rewards": [...]})."""

    def __init__(self, url: str, timeout_s: float = 300.0, batch_size: int = 256):
        self.url, self.timeout_s, self.batch_size = url, timeout_s, batch_size
        self.__name__ = "http_reward"

    def __call__(self, prompts=None, completions=None, **columns) -> list[float]:
        prompts = prompts if prompts is not None else [None] * len(completions)
        out: list[float] = []
        for start in range(0, len(completions), self.batch_size):
            body = json.dumps({"prompts": prompts[start:start + self.batch_size],
                               "completions": completions[start:start + self.batch_size]}).encode()
            request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    reply = json.loads(response.read())
            except urllib.error.HTTPError as e:
                raise RuntimeError(f"reward server {self.url} answered {e.code}: {e.read()[:500]!r}") from None
            except (urllib.error.URLError, TimeoutError) as e:
                raise RuntimeError(f"reward server {self.url} unreachable: {e}") from None
            rewards = reply.get("rewards") if isinstance(reply, dict) else None
            n = len(completions[start:start + self.batch_size])
            if not isinstance(rewards, list) or len(rewards) != n:
                raise RuntimeError(f"reward server {self.url} sent {str(reply)[:200]!r}, expected {n} rewards")
            out.extend(float(r) if r is not None else None for r in rewards)
        return out
