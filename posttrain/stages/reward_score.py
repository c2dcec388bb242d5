"""`posttrain reward score`: score a jsonl of completions with a named reward.

Each input line is a JSON object with a `completion` (string or chat messages), optionally a
`prompt`, and the columns the reward needs (`answer` for math; `test` + `entry_point`,
`test_list` or `inputs`/`outputs` for code). Field names can be remapped. The output is the
input records with `reward` (and `reward_reason` where the reward explains itself) added;
lines that cannot be scored go to `<out>.rejects.jsonl` with the reason; a summary of the
scores and failure reasons is printed and written to `<out>.summary.json`.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from posttrain.io_utils import atomic_write_json, read_jsonl
from reward.calling import call_reward


def _read_records(path: Path, mapping: dict[str, str]):
    """Yield (line number, record or None, reject reason or None)."""
    for n, rec, why in read_jsonl(path):
        if rec is None:
            yield n, None, why
            continue
        for ours, theirs in mapping.items():
            if theirs in rec:
                rec[ours] = rec[theirs]
        completion = rec.get("completion")
        if completion is None:
            yield n, None, "missing field 'completion'"
        elif not isinstance(completion, (str, list)):
            yield n, None, f"'completion' must be a string or a list of messages, got {type(completion).__name__}"
        else:
            yield n, rec, None


def score_file(reward_name: str, data: Path, out: Path, mapping: dict[str, str] | None = None,
               batch_size: int = 64, options: dict | None = None) -> dict:
    import reward

    fn = reward.get(reward_name, **(options or {}))
    explain = getattr(fn, "explain", None)
    records, rejects = [], []
    for n, rec, why in _read_records(data, mapping or {}):
        if rec is None:
            rejects.append({"line": n, "reason": why})
        else:
            records.append((n, rec))
    scores: list[float | None] = []
    reasons: list[str | None] = []
    with tqdm(total=len(records), desc=f"reward {reward_name}", unit="sample") as bar:
        for start in range(0, len(records), batch_size):
            batch = [rec for _, rec in records[start:start + batch_size]]
            columns = {k: [r.get(k) for r in batch] for k in set().union(*batch) - {"completion", "prompt"}}
            prompts = [r.get("prompt") for r in batch]
            completions = [r["completion"] for r in batch]
            if explain is not None:
                pairs = explain(prompts=prompts, completions=completions, **columns)
                scores += [s for s, _ in pairs]
                reasons += [r for _, r in pairs]
            else:  # by keyword, as TRL calls rewards; a `completion_ids` field is passed as such
                scores += call_reward(fn, prompts, completions, name=reward_name, **columns)
                reasons += [None] * len(batch)
            bar.update(len(batch))
    isolation = getattr(fn, "isolation", None)  # code: the sandbox's level, with every score
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for (_, rec), s, why in zip(records, scores, reasons):
            rec = dict(rec, reward=s)
            if why is not None:
                rec["reward_reason"] = why
            if isolation is not None:
                rec["reward_isolation"] = isolation
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    rejects_path = out.with_name(out.name + ".rejects.jsonl")
    if rejects:
        with open(rejects_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rejects)
    valid = [s for s in scores if s is not None and not math.isnan(s)]
    failures = Counter(why for s, why in zip(scores, reasons) if why and (s is None or s < 1.0))
    summary = {
        "reward": reward_name, "input": str(data), "output": str(out),
        "scored": len(valid), "not_applicable": sum(s is None for s in scores), "rejected_lines": len(rejects),
        "mean": sum(valid) / len(valid) if valid else None,
        "min": min(valid) if valid else None, "max": max(valid) if valid else None,
        "full_score": sum(s == 1.0 for s in valid), "zero_score": sum(s == 0.0 for s in valid),
        "failure_reasons": dict(failures.most_common(20)),
    }
    if isolation is not None:
        summary["isolation"] = isolation
    if rejects:
        summary["rejects_file"] = str(rejects_path)
    atomic_write_json(out.with_name(out.name + ".summary.json"), summary)
    return summary


def print_summary(s: dict) -> None:
    mean = f"{s['mean']:.4f}" if s["mean"] is not None else "n/a"
    print(f"{s['reward']}: {s['scored']} scored, mean {mean}, {s['full_score']} full / {s['zero_score']} zero, "
          f"{s['not_applicable']} not applicable, {s['rejected_lines']} rejected lines")
    for why, k in s["failure_reasons"].items():
        print(f"  {k:6d}  {why}")
    if s.get("rejects_file"):
        print(f"rejected lines and reasons: {s['rejects_file']}")
    print(f"scores: {s['output']}")
