"""`posttrain distill filter`: keep what is correct, complete and readable; explain every drop.

Input: a `distill generate` output directory, or jsonl files of records with at least
`completion`, `problem` and `prompt_id` (others: `id`, `sample_idx`, `task`, `finish_reason`,
`completion_tokens`, and the verifier columns `answer` / `test` + `entry_point`).
Output directory: kept.jsonl, rejects.jsonl (each record with `reject_reason`; unreadable
lines with the line and the reason), summary.json (counts per reason, pass rates, markers).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data_recipes.distill_filters import FilterConfig, filter_records
from posttrain.errors import all_rejected
from posttrain.io_utils import atomic_write_json, atomic_write_text, read_jsonl, record_problem
from posttrain.outputs import claim_output
from posttrain.stages.common import local_inputs, require


@dataclass
class FilterStageConfig:
    input: str | None = None           # a `distill generate` directory, or a jsonl file of records
    output_dir: str | None = None
    filter: FilterConfig = field(default_factory=FilterConfig)


def run_filter_stage(cfg: FilterStageConfig, overwrite: bool = False, restart: bool = False) -> dict:
    """The `distill filter` stage from its config: the output claimed, the records filtered,
    and the generation's settings (system prompt, chat template) carried to the output."""
    require(cfg, "input", "output_dir")
    source, out = Path(cfg.input), Path(cfg.output_dir)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or directory (the output of `distill generate`)")
    claim_output("distill filter", out, cfg, local_inputs(source), overwrite=overwrite, restart=restart)
    summary = run_filter(source, out, cfg.filter)
    if source.is_dir() and (source / "manifest.json").exists():  # provenance travels with the data
        shutil.copyfile(source / "manifest.json", out / "generation.json")
    if summary["records"] and not summary["kept"] and summary["rejected"] == summary["records"] \
            and all(r.startswith("bad_record") for r in summary["reasons"]):
        raise all_rejected("records", summary["records"], out / "rejects.jsonl")
    return summary

REQUIRED = {"completion": str, "problem": str, "prompt_id": (str, int)}


def read_generated(source: Path) -> tuple[list[dict], list[dict]]:
    """(records, bad lines as rejects) from a generate directory or a jsonl file."""
    files = sorted((source / "shards").glob("gen-*.jsonl")) if source.is_dir() else [source]
    if source.is_dir() and not files:
        raise FileNotFoundError(f"{source} has no shards/gen-*.jsonl: is it a `distill generate` output?")
    records, bad = [], []
    for path in files:
        for n, rec, why in read_jsonl(path):
            where = {"file": str(path), "line": n}
            if rec is None:
                bad.append({**where, "reject_reason": f"bad_record: {why}"})
                continue
            problem = record_problem(rec, REQUIRED)
            if problem:
                bad.append({**where, "reject_reason": f"bad_record: {problem}"})
                continue
            rec["prompt_id"] = str(rec["prompt_id"])
            rec.setdefault("sample_idx", 0)
            rec.setdefault("id", f"{rec['prompt_id']}#{rec['sample_idx']}")
            rec.setdefault("finish_reason", "stop")
            rec.setdefault("task", "math" if "answer" in rec else "code" if "test" in rec else None)
            records.append(rec)
    return records, bad


def run_filter(source: Path, out: Path, cfg: FilterConfig) -> dict:
    records, bad = read_generated(source)
    kept, rejects, pass_rate = filter_records(records, cfg)
    rejects = bad + rejects
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "kept.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    atomic_write_text(out / "rejects.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    rates = list(pass_rate.values())
    summary = {
        "input": str(source), "records": len(records) + len(bad), "kept": len(kept), "rejected": len(rejects),
        "reasons": dict(Counter(r["reject_reason"].split(":")[0] for r in rejects).most_common()),
        "prompts": len({r["prompt_id"] for r in records}), "prompts_kept": len({r["prompt_id"] for r in kept}),
        "mean_pass_rate": sum(rates) / len(rates) if rates else None,
        "mean_reflection_markers_kept": (sum(r["reflection_markers"] for r in kept) / len(kept)) if kept else None,
    }
    atomic_write_json(out / "summary.json", summary)
    return summary
