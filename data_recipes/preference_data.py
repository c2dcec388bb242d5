"""Preference pairs for reward-model training and evaluation.

Accepted row shapes (the field names are configurable with `PairFields`):
  * prompt + chosen + rejected as strings (a single user turn and two answers);
  * chosen / rejected as chat-message lists, whole conversations or just the answer turns,
    with or without a `prompt` (string or messages) holding the shared beginning;
  * HH-RLHF: chosen / rejected strings "\\n\\nHuman: ... \\n\\nAssistant: ..." parsed into
    messages; the turns both share are the prompt.
Optional columns: `margin` (how much better chosen is, used by the loss), `subset` (reported
separately by `rm eval`), `id`.

Every row that cannot be used is returned as a reject with its line and reason; pairs over
the length limit are truncated or dropped by choice and counted either way.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.io_utils import read_jsonl

from .prompt_sets import read_table

IGNORE = -100
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


@dataclass
class PairFields:
    prompt: str | None = "prompt"      # absent column = no separate prompt
    chosen: str = "chosen"
    rejected: str = "rejected"
    margin: str | None = "margin"
    subset: str | None = "subset"
    id: str | None = "id"


@dataclass
class PreferencePair:
    id: str
    prompt: list[dict]                  # shared conversation before the answers (may be empty)
    chosen: list[dict]                  # the answer turn(s)
    rejected: list[dict]
    margin: float | None = None
    subset: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class PairError(ValueError):
    pass


def parse_hh(text: str) -> list[dict]:
    """"\\n\\nHuman: a\\n\\nAssistant: b" -> [{"role": "user", ...}, {"role": "assistant", ...}]."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise PairError("not in HH-RLHF format (expected '\\n\\nHuman: ... \\n\\nAssistant: ...')")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return messages


def _as_messages(value: Any, what: str, default_role: str) -> list[dict]:
    if isinstance(value, str):
        if value.startswith("\n\nHuman:"):
            return parse_hh(value)
        return [{"role": default_role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                       and m.get("role") in ("system", "user", "assistant") for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise PairError(f"field {what!r} must be a string or a list of {{role, content}} messages")


def _split_common(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(shared prefix, chosen rest, rejected rest): whole conversations share their prompt turns."""
    k = 0  # leave at least one turn on each side
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
        k += 1
    return chosen[:k], chosen[k:], rejected[k:]


def to_pair(rec: dict, fields: PairFields, default_id: str) -> PreferencePair:
    for name in (fields.chosen, fields.rejected):
        if rec.get(name) is None:
            raise PairError(f"missing field {name!r}")
    chosen = _as_messages(rec[fields.chosen], fields.chosen, "assistant")
    rejected = _as_messages(rec[fields.rejected], fields.rejected, "assistant")
    prompt_value = rec.get(fields.prompt) if fields.prompt else None
    if prompt_value is not None:
        prompt = _as_messages(prompt_value, fields.prompt, "user")
        # whole conversations repeated under `prompt`: drop the repeated part
        if chosen[: len(prompt)] == prompt and rejected[: len(prompt)] == prompt and len(chosen) > len(prompt):
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    else:
        prompt, chosen, rejected = _split_common(chosen, rejected)
    if not chosen or not rejected:
        raise PairError("chosen or rejected has no answer turn")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise PairError("chosen and rejected must end with an assistant turn")
    if not chosen[-1]["content"].strip() or not rejected[-1]["content"].strip():
        raise PairError("empty answer")
    if chosen == rejected:
        raise PairError("chosen and rejected are identical")
    margin = rec.get(fields.margin) if fields.margin else None
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise PairError(f"field {fields.margin!r} must be a number")
        margin = float(margin)
        if not math.isfinite(margin):
            raise PairError(f"field {fields.margin!r} must be a finite number, got {margin}")
    subset = rec.get(fields.subset) if fields.subset else None
    rid = rec.get(fields.id) if fields.id else None
    return PreferencePair(str(rid) if rid is not None else default_id, prompt, chosen, rejected, margin,
                          str(subset) if subset is not None else None)


def load_pairs(source: str, fields: PairFields | None = None,
               limit: int | None = None) -> tuple[list[PreferencePair], list[dict]]:
    """(pairs, rejects as {"source", "line", "id", "reason"}) from jsonl(.gz) / parquet / a saved
    HF dataset / hf:NAME[:config][@split]."""
    fields = fields or PairFields()
    pairs, rejects = [], []
    stem = Path(source).name.split(".")[0] or "pairs"
    for n, rec, why in read_table(source):
        if limit is not None and len(pairs) >= limit:
            break
        if rec is None:
            rejects.append({"source": source, "line": n, "id": None, "reason": f"bad_record: {why}"})
            continue
        try:
            pairs.append(to_pair(rec, fields, f"{stem}-{n}"))
        except PairError as e:
            rid = rec.get(fields.id) if fields.id else None
            rejects.append({"source": source, "line": n, "id": rid, "reason": str(e)})
    return pairs, rejects


# --------------------------------------------------------------------------- tokenization
@dataclass
class TokenizedPair:
    pair: PreferencePair
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False


def _ids(tokenizer, messages: list[dict]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def _truncate_left(ids: list[int], prompt_len: int, max_length: int, keep_first: bool) -> list[int] | None:
    """Cut the prompt from the left (after bos) so the answer stays whole; None if the answer
    alone does not fit."""
    head = ids[:1] if keep_first else []
    prompt, answer = ids[len(head):prompt_len], ids[prompt_len:]
    room = max_length - len(head) - len(answer)
    if room < 0:
        return None
    return head + (prompt[len(prompt) - room:] if room else []) + answer


def tokenize_pairs(tokenizer, pairs: list[PreferencePair], max_length: int, overlong: str = "drop"
                   ) -> tuple[list[TokenizedPair], list[dict], dict]:
    """Chat-template both conversations. Over-long pairs are dropped, or (`truncate`) lose the
    oldest prompt tokens so that the answers, where the score is read, stay whole. Returns
    (tokenized, skipped with reasons, counts)."""
    if overlong not in ("drop", "truncate"):
        raise ValueError(f"overlong must be 'drop' or 'truncate', got {overlong!r}")
    out, skipped = [], []
    counts = Counter()
    bos = getattr(tokenizer, "bos_token_id", None)
    for pair in pairs:
        try:
            c = _ids(tokenizer, pair.prompt + pair.chosen)
            r = _ids(tokenizer, pair.prompt + pair.rejected)
        except Exception as e:  # noqa: BLE001 - a pair the template or tokenizer refuses: skip it, say why
            skipped.append({"id": pair.id, "reason": f"cannot be tokenized: {type(e).__name__}: {str(e)[:200]}"})
            continue
        truncated = False
        if len(c) > max_length or len(r) > max_length:
            counts["overlong"] += 1
            if overlong == "drop":
                skipped.append({"id": pair.id, "reason": f"overlong: {max(len(c), len(r))} tokens > {max_length}"})
                continue
            # the prompt's tokens are the common prefix of both renderings
            p = 0
            while p < min(len(c), len(r)) and c[p] == r[p]:
                p += 1
            keep_first = bos is not None and c[:1] == [bos]
            c2 = _truncate_left(c, p, max_length, keep_first)
            r2 = _truncate_left(r, p, max_length, keep_first)
            if c2 is None or r2 is None:
                skipped.append({"id": pair.id, "reason": f"overlong: an answer alone exceeds {max_length} tokens"})
                continue
            c, r, truncated = c2, r2, True
            counts["truncated"] += 1
        out.append(TokenizedPair(pair, c, r, truncated))
    counts["kept"] = len(out)
    counts["skipped"] = len(skipped)
    return out, skipped, dict(counts)


def collate_pairs(batch: list[TokenizedPair], pad_token_id: int, padding_side: str = "right") -> dict:
    """chosen rows first, then rejected rows: input_ids / attention_mask [2B, T] + margins."""
    import torch

    seqs = [p.chosen_ids for p in batch] + [p.rejected_ids for p in batch]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if padding_side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    margins = torch.tensor([p.pair.margin or 0.0 for p in batch], dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": mask, "margin": margins}


# --------------------------------------------------------------------------- recipe
def pairs_from_distillation(filtered_dir: str | Path, per_prompt: int = 1,
                            only_wrong_answers: bool = True) -> list[PreferencePair]:
    """Verified-vs-unverified pairs from `distill filter` output: for each prompt with at least one
    kept (verified correct) and one rejected response, pair them (up to `per_prompt` pairs).
    By default only responses whose answer was checked and found wrong are used as rejected,
    not those dropped for form (truncation, language mixing, repetition)."""
    filtered_dir = Path(filtered_dir)
    good: dict[str, list[dict]] = {}
    bad: dict[str, list[dict]] = {}
    for path, target in ((filtered_dir / "kept.jsonl", good), (filtered_dir / "rejects.jsonl", bad)):
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: is {filtered_dir} a `distill filter` output?")
        for _, rec, _ in read_jsonl(path):
            if rec is None or "completion" not in rec or "prompt_id" not in rec:
                continue
            if target is bad and only_wrong_answers:
                score = (rec.get("verification") or {}).get("score")
                if score is None or score >= 1.0:
                    continue
            target.setdefault(str(rec["prompt_id"]), []).append(rec)
    pairs = []
    for pid in sorted(set(good) & set(bad)):
        goods, bads = good[pid], bad[pid]
        for k in range(min(per_prompt, len(goods), len(bads))):
            g, b = goods[k], bads[k]
            prompt = list(g.get("messages") or [{"role": "user", "content": g["problem"]}])
            pairs.append(PreferencePair(
                f"{pid}#{k}", prompt, [{"role": "assistant", "content": g["completion"]}],
                [{"role": "assistant", "content": b["completion"]}], None, g.get("task"),
                {"chosen_id": g.get("id"), "rejected_id": b.get("id"),
                 "rejected_reason": b.get("reject_reason")}))
    return pairs


def pair_to_row(pair: PreferencePair) -> dict:
    """The jsonl form `load_pairs` reads back (conversational chosen / rejected, explicit prompt)."""
    row = {"id": pair.id, "prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
    if pair.margin is not None:
        row["margin"] = pair.margin
    if pair.subset is not None:
        row["subset"] = pair.subset
    if pair.meta:
        row["meta"] = json.dumps(pair.meta)
    return row
