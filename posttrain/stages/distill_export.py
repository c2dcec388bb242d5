"""`posttrain distill export`: kept samples as SFT-ready chat data with provenance.

Two kinds of sample, as the DeepSeek-V3 report builds them:
  "r1"        system prompt + problem -> the teacher's (R1-style) response
  "original"  problem -> the dataset's own reference response (one per prompt, when present)
`--kinds r1` (default) writes the first, `both` adds the second. Every row has `messages`
(role/content list, the format TRL and HF chat templates read), `kind`, `prompt_id`,
`sample_id`, `task`, `answer`, and provenance: `teacher`, `sampling`, `verification`
(JSON strings, so every row has the same schema in Arrow). Formats: jsonl, parquet, or an
HF `save_to_disk` directory; the output appears atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from data_recipes.r1_prompts import R1_SYSTEM_PROMPT
from posttrain.io_utils import atomic_write_text


def _rows(kept: list[dict], kinds: str, system_prompt: str | None) -> list[dict]:
    rows, originals = [], set()
    for rec in kept:
        base = {"prompt_id": rec["prompt_id"], "task": rec.get("task"), "answer": rec.get("answer"),
                "teacher": json.dumps(rec.get("teacher"), sort_keys=True),
                "sampling": json.dumps(rec.get("sampling"), sort_keys=True)}
        user = next((m["content"] for m in rec.get("messages", []) if m.get("role") == "user"), rec["problem"])
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": rec["completion"]}]
        rows.append({"messages": messages, "kind": "r1", "sample_id": rec["id"],
                     "verification": json.dumps(rec.get("verification"), sort_keys=True), **base})
        if kinds == "both" and rec.get("reference") and rec["prompt_id"] not in originals:
            originals.add(rec["prompt_id"])
            rows.append({"messages": [{"role": "user", "content": rec["problem"]},
                                      {"role": "assistant", "content": rec["reference"]}],
                         "kind": "original", "sample_id": f"{rec['prompt_id']}#original",
                         "verification": json.dumps({"score": None, "reason": "dataset reference"}), **base})
    return rows


def read_kept(source: Path) -> list[dict]:
    path = source / "kept.jsonl" if source.is_dir() else source
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: export reads the output of `distill filter`")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def export(source: Path, out: Path, fmt: str = "jsonl", kinds: str = "r1",
           system_prompt: str | None = R1_SYSTEM_PROMPT) -> dict:
    if fmt not in ("jsonl", "parquet", "hf"):
        raise ValueError(f"format must be jsonl, parquet or hf, got {fmt!r}")
    if kinds not in ("r1", "both"):
        raise ValueError(f"kinds must be r1 or both, got {kinds!r}")
    rows = _rows(read_kept(source), kinds, system_prompt)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    else:
        import datasets

        ds = datasets.Dataset.from_list(rows)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        if fmt == "parquet":
            ds.to_parquet(str(tmp))
            os.replace(tmp, out)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            ds.save_to_disk(str(tmp))
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
    return {"rows": len(rows), "r1": sum(r["kind"] == "r1" for r in rows),
            "original": sum(r["kind"] == "original" for r in rows), "format": fmt, "output": str(out)}
