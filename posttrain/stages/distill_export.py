"""`posttrain distill export`: kept samples as SFT-ready chat data with provenance.

Two kinds of sample, as the DeepSeek-V3 report builds them:
  "r1"        system prompt + problem -> the teacher's (R1-style) response
  "original"  problem -> the dataset's own reference response (one per prompt, when present)
`kinds: r1` (default) writes the first, `both` adds the second. Every row has `messages`
(role/content list, the format TRL and HF chat templates read), `kind`, `prompt_id`,
`sample_id`, `task`, `answer`, and provenance: `system_prompt`, `teacher`, `sampling`,
`verification` (JSON strings, so every row has the same schema in Arrow). The system prompt
is the one the teacher was sampled with, kept from the generated messages, unless the config
says `system_prompt: null` (none) or gives another; the summary says which were used.
Formats: jsonl, parquet, or an HF `save_to_disk` directory; the output appears atomically,
and an HF directory is replaced file by file, never removed as a whole.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import setting
from posttrain.errors import all_rejected
from posttrain.io_utils import atomic_write_text, read_jsonl, record_problem
from posttrain.outputs import claim_output
from posttrain.stages.common import local_inputs, require, text_option

KEEP = "keep"


@dataclass
class ExportConfig:
    input: str | None = None           # a `distill filter` directory or its kept.jsonl
    output: str | None = None          # a .jsonl / .parquet file, or a directory (format hf)
    format: str = setting("jsonl", choices=("jsonl", "parquet", "hf"))
    kinds: str = setting("r1", choices=("r1", "both"))
    system_prompt: str | None = KEEP   # keep: the generation's own; null: none; or text / @FILE


def run_export(cfg: ExportConfig, overwrite: bool = False, restart: bool = False) -> dict:
    require(cfg, "input", "output")
    source, out = Path(cfg.input), Path(cfg.output)
    system = cfg.system_prompt if cfg.system_prompt == KEEP else text_option(cfg.system_prompt, "system_prompt")
    claim_output("distill export", out, cfg, local_inputs(source), is_dir=cfg.format == "hf", overwrite=overwrite,
                 restart=restart)
    return export(source, out, cfg.format, cfg.kinds, system)


def _messages(rec: dict, system_prompt: str | None) -> tuple[list[dict], str | None]:
    """The sample's conversation and the system prompt in it: the generated one (`keep`), none,
    or a replacement."""
    generated = [m for m in rec.get("messages") or [] if isinstance(m, dict)]
    own = next((m.get("content") for m in generated if m.get("role") == "system"), None)
    user = next((m["content"] for m in generated if m.get("role") == "user"), rec["problem"])
    system = own if system_prompt == KEEP else system_prompt
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": user}, {"role": "assistant", "content": rec["completion"]}], system


def _rows(kept: list[dict], kinds: str, system_prompt: str | None) -> list[dict]:
    rows, originals = [], set()
    for rec in kept:
        base = {"prompt_id": rec["prompt_id"], "task": rec.get("task"), "answer": rec.get("answer"),
                "teacher": json.dumps(rec.get("teacher"), sort_keys=True),
                "sampling": json.dumps(rec.get("sampling"), sort_keys=True)}
        messages, system = _messages(rec, system_prompt)
        rows.append({"messages": messages, "kind": "r1", "sample_id": rec["id"], "system_prompt": system,
                     "verification": json.dumps(rec.get("verification"), sort_keys=True), **base})
        if kinds == "both" and rec.get("reference") and rec["prompt_id"] not in originals:
            originals.add(rec["prompt_id"])
            rows.append({"messages": [{"role": "user", "content": rec["problem"]},
                                      {"role": "assistant", "content": rec["reference"]}],
                         "kind": "original", "sample_id": f"{rec['prompt_id']}#original", "system_prompt": None,
                         "verification": json.dumps({"score": None, "reason": "dataset reference"}), **base})
    return rows


REQUIRED = {"prompt_id": (str, int), "problem": str, "completion": str, "id": (str, int)}


def read_kept(source: Path) -> tuple[list[dict], list[dict]]:
    """(records, rejects with the reason) from a `distill filter` output."""
    path = source / "kept.jsonl" if source.is_dir() else source
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: export reads the output of `distill filter`")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: export reads kept.jsonl of `distill filter`")
    records, rejects = [], []
    for n, rec, why, raw in read_jsonl(path, raw=True):
        if rec is not None:
            why = record_problem(rec, REQUIRED)
        if why:
            rejects.append({"file": str(path), "line": n, "reason": why, "text": raw})
        else:
            records.append(rec)
    return records, rejects


def export(source: Path, out: Path, fmt: str = "jsonl", kinds: str = "r1", system_prompt: str | None = KEEP) -> dict:
    if fmt not in ("jsonl", "parquet", "hf"):
        raise ValueError(f"format must be jsonl, parquet or hf, got {fmt!r}")
    if kinds not in ("r1", "both"):
        raise ValueError(f"kinds must be r1 or both, got {kinds!r}")
    kept, rejects = read_kept(source)
    rejects_path = (out / "rejects.jsonl") if fmt == "hf" else out.with_name(out.name + ".rejects.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        out.mkdir(exist_ok=True)
    atomic_write_text(rejects_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    if not kept:
        raise all_rejected("records", len(rejects), rejects_path)
    rows = _rows(kept, kinds, system_prompt)
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
            shutil.rmtree(tmp, ignore_errors=True)  # this stage's own temporary name
            ds.save_to_disk(str(tmp))
            _install_dataset(tmp, out)
    used = Counter(r["system_prompt"] for r in rows if r["kind"] == "r1")
    summary = {"rows": len(rows), "r1": sum(r["kind"] == "r1" for r in rows),
               "original": sum(r["kind"] == "original" for r in rows), "format": fmt, "output": str(out),
               "rejected": len(rejects), "rejects_file": str(rejects_path),
               "system_prompts": [{"system_prompt": k, "rows": v} for k, v in used.most_common()],
               "system_prompt_policy": "kept from generation" if system_prompt == KEEP else
               ("none" if system_prompt is None else "replaced")}
    generation = (source if source.is_dir() else source.parent) / "generation.json"
    if generation.exists():  # the generation's settings (system prompt, chat template) travel on
        sidecar = out / "generation.json" if fmt == "hf" else out.with_name(out.name + ".generation.json")
        shutil.copyfile(generation, sidecar)
    return summary


def _install_dataset(tmp: Path, out: Path) -> None:
    """Move a saved dataset's files from `tmp` into `out` one by one: the previous dataset's
    own files (the data files its state.json lists) go, anything else in `out` stays."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        previous = json.loads((out / "state.json").read_text()).get("_data_files", [])
    except (OSError, ValueError):
        previous = []
    new = {p.name for p in tmp.iterdir()}
    for entry in previous:
        name = entry.get("filename") if isinstance(entry, dict) else None
        if name and name not in new and "/" not in name:
            (out / name).unlink(missing_ok=True)
    for path in tmp.iterdir():
        os.replace(path, out / path.name)
    tmp.rmdir()
