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
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from posttrain.config import setting
from posttrain.model.args import ConfigError
from posttrain.errors import all_rejected
from posttrain.outputs import claim_output
from posttrain.stages.common import local_inputs, require

from posttrain.io_utils import atomic_write_json, atomic_write_text, read_jsonl
from reward.calling import call_reward


@dataclass
class ScoreConfig:
    reward: str | None = None          # a reward name (math, code, ...) or module:function
    data: str | None = None            # jsonl: completion, prompt, and the reward's columns
    output: str | None = None          # scored jsonl (+ .summary.json and .rejects.jsonl beside it)
    map: dict = field(default_factory=dict)       # our field name -> the data's (completion: response)
    options: dict = field(default_factory=dict)   # the reward's constructor options
    batch_size: int = setting(64, ge=1)


def run_score(cfg: ScoreConfig, overwrite: bool = False, restart: bool = False) -> dict:
    require(cfg, "reward", "data", "output")
    data, out = Path(cfg.data), Path(cfg.output)
    if not data.exists():
        raise FileNotFoundError(f"{data}: no such file (the completions to score)")
    if data.is_dir():
        raise IsADirectoryError(f"{data} is a directory; give the jsonl file of completions")
    bad = {k: v for k, v in cfg.map.items() if not (isinstance(k, str) and isinstance(v, str) and v)}
    if bad:
        raise ValueError(f"map: each entry is OURS=THEIRS field names, got {bad}")
    claim_output("reward score", out, cfg, local_inputs(data), is_dir=False, overwrite=overwrite, restart=restart)
    return score_file(cfg.reward, data, out, cfg.map, cfg.batch_size, cfg.options)


def _read_records(path: Path, mapping: dict[str, str]):
    """Yield (line number, record or None, reject reason or None, the line's start)."""
    for n, rec, why, raw in read_jsonl(path, raw=True):
        if rec is None:
            yield n, None, why, raw
            continue
        for ours, theirs in mapping.items():
            if theirs in rec:
                rec[ours] = rec[theirs]
        completion = rec.get("completion")
        if completion is None:
            yield n, None, "missing field 'completion'", raw
        elif isinstance(completion, list) and not all(isinstance(m, dict) and isinstance(m.get("content", ""), str)
                                                      for m in completion):
            yield n, None, "'completion' messages must be objects with text 'content'", raw
        elif not isinstance(completion, (str, list)):
            yield n, None, f"'completion' must be a string or a list of messages, got {type(completion).__name__}", raw
        else:
            yield n, rec, None, raw


def score_file(reward_name: str, data: Path, out: Path, mapping: dict[str, str] | None = None,
               batch_size: int = 64, options: dict | None = None) -> dict:
    import reward

    try:
        fn = reward.get(reward_name, **(options or {}))
    except KeyError as e:
        raise ConfigError(f"reward={reward_name!r}: {e.args[0]}") from None
    except TypeError as e:
        raise ConfigError(f"options {options}: reward {reward_name!r} does not take them ({e})") from None
    explain = getattr(fn, "explain", None)
    records, rejects = [], []
    for n, rec, why, raw in _read_records(data, mapping or {}):
        if rec is None:
            rejects.append({"file": str(data), "line": n, "reason": why, "text": raw})
        else:
            records.append((n, rec))

    def score(batch: list[dict]) -> list[tuple[float | None, str | None]]:
        columns = {k: [r.get(k) for r in batch] for k in set().union(*batch) - {"completion", "prompt"}}
        prompts = [r.get("prompt") for r in batch]
        completions = [r["completion"] for r in batch]
        if explain is not None:
            return list(explain(prompts=prompts, completions=completions, **columns))
        # by keyword, as TRL calls rewards; a `completion_ids` field is passed as such
        return [(v, None) for v in call_reward(fn, prompts, completions, name=reward_name, **columns)]

    scored: list[tuple[int, dict, float | None, str | None]] = []
    with tqdm(total=len(records), desc=f"reward {reward_name}", unit="sample") as bar:
        for start in range(0, len(records), batch_size):
            part = records[start:start + batch_size]
            try:
                results = score([rec for _, rec in part])
            except (ValueError, TypeError, KeyError):  # one row the reward cannot take: find it, go on
                results = []
                for n, rec in part:
                    try:
                        results += score([rec])
                    except (ValueError, TypeError, KeyError) as e:
                        rejects.append({"file": str(data), "line": n, "reason": f"the reward failed on it: "
                                        f"{type(e).__name__}: {e}"[:500]})
                        results.append(None)
            scored += [(n, rec, *r) for (n, rec), r in zip(part, results) if r is not None]
            bar.update(len(part))
    records = [(n, rec) for n, rec, _, _ in scored]
    scores = [s for _, _, s, _ in scored]
    reasons = [why for _, _, _, why in scored]
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
    atomic_write_text(rejects_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    if not records:
        raise all_rejected(f"lines in {data}", len(rejects), rejects_path)
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
