"""Prompt sets for distillation: files (jsonl, parquet), HF datasets, and built-in recipes.

A prompt set is read into `PromptRecord`s: a stable id, the problem text, the task kind
(what verifies its answers: "math", "code", or None) and the columns verifiers and exports
need (gold `answer`, code `test` + `entry_point`, the dataset's own `reference` solution).
A field mapping says where each lives in the source; every other field of a record is kept
as a column under its own name, as TRL passes a dataset's columns to reward functions. Records that cannot be used are
returned as rejects with a reason, never dropped silently.

Built-in recipes read the real data in ../shared/data (or $POSTTRAIN_SHARED_DATA):
gsm8k (train), math500, humaneval, and `synthetic`, the embedded arithmetic task.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.config import setting
from posttrain.errors import DataError
from posttrain.io_utils import read_jsonl
from reward.math_answer import gsm8k_gold

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("POSTTRAIN_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@dataclass
class PromptRecord:
    id: str
    problem: str
    task: str | None = None                 # "math" | "code" | None
    columns: dict[str, Any] = field(default_factory=dict)  # answer, test, entry_point, reference, ...


@dataclass
class FieldMap:
    """Source field names. `answer_format="gsm8k"` takes the number after '####'."""

    problem: str = "problem"
    id: str | None = None
    answer: str | None = None
    answer_format: str = setting("plain", choices=("plain", "gsm8k"))
    reference: str | None = None
    test: str | None = None
    entry_point: str | None = None
    code_prompt: str | None = None
    task: str | None = None                 # fixed task kind for the whole set


RECIPES: dict[str, tuple[str, FieldMap]] = {
    "gsm8k": ("gsm8k_train.jsonl", FieldMap(problem="question", answer="answer", answer_format="gsm8k",
                                            reference="answer", task="math")),
    "gsm8k-test": ("gsm8k_test.jsonl", FieldMap(problem="question", answer="answer", answer_format="gsm8k",
                                                reference="answer", task="math")),
    "math500": ("math500_test.jsonl", FieldMap(problem="problem", id="unique_id", answer="answer",
                                               reference="solution", task="math")),
    "humaneval": ("humaneval.jsonl.gz", FieldMap(problem="prompt", id="task_id", test="test",
                                                 entry_point="entry_point", code_prompt="prompt",
                                                 reference="canonical_solution", task="code")),
}


def read_table(source: str) -> Iterator[tuple[int, dict | None, str | None]]:
    path = Path(source)
    if path.suffix in (".jsonl", ".json") or path.name.endswith(".jsonl.gz"):
        yield from read_jsonl(path)
        return
    import datasets

    if path.suffix == ".parquet" or path.is_dir():
        if not path.exists():
            raise FileNotFoundError(f"{source}: no such file or directory")
        try:
            if path.suffix == ".parquet":
                ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
            else:
                ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - a corrupt file or a directory of something else: one line
            raise DataError(f"{source}: not a readable {'parquet file' if path.suffix == '.parquet' else 'saved HF dataset'}"
                            f" ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    elif source.startswith("hf:"):  # hf:name[:config][@split]
        name, _, split = source[3:].partition("@")
        name, _, config = name.partition(":")
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    else:
        raise FileNotFoundError(f"prompt source {source!r}: not a recipe ({', '.join(sorted(RECIPES))}, synthetic), "
                                "a .jsonl/.parquet file, a saved HF dataset directory, or hf:NAME")
    for n, rec in enumerate(ds, start=1):
        yield n, dict(rec), None


def _convert(n: int, rec: dict, fields: FieldMap, source_name: str) -> tuple[PromptRecord | None, str | None]:
    problem = rec.get(fields.problem)
    if problem is None:
        return None, f"missing field {fields.problem!r}"
    if not isinstance(problem, str):
        return None, f"field {fields.problem!r} must be a string, got {type(problem).__name__}"
    if not problem.strip():
        return None, "empty problem"
    rid = rec.get(fields.id) if fields.id else None
    if fields.id and rid is None:
        return None, f"missing field {fields.id!r}"
    rid = str(rid) if rid is not None else f"{source_name}-{n}"
    cols: dict[str, Any] = {}
    if fields.answer:
        gold = rec.get(fields.answer)
        if gold is None:
            return None, f"missing field {fields.answer!r}"
        if not isinstance(gold, (str, int, float)) or isinstance(gold, bool):
            return None, f"field {fields.answer!r} must be a string or number, got {type(gold).__name__}"
        if fields.answer_format == "gsm8k":
            try:
                gold = gsm8k_gold(str(gold))
            except ValueError as e:
                return None, str(e)
        cols["answer"] = str(gold)
    for key in ("reference", "test", "entry_point", "code_prompt"):
        name = getattr(fields, key)
        if name:
            value = rec.get(name)
            if value is None and key in ("test", "entry_point"):
                return None, f"missing field {name!r}"
            if value is not None and not isinstance(value, str):
                return None, f"field {name!r} must be a string, got {type(value).__name__}"
            if value is not None:
                cols[key] = value
    task = fields.task or ("code" if "test" in cols else "math" if "answer" in cols else None)
    # every other field travels as a column under its own name (TRL hands reward functions all
    # of a dataset's columns); the mapped columns win a clash
    for key, value in rec.items():
        if key not in (fields.problem, fields.id) and key not in cols:
            cols[key] = value
    return PromptRecord(rid, problem, task, cols), None


GOLD_LIKE = ("answer", "solution", "gold", "final_answer", "ground_truth", "label", "target", "expected_output")


def unmapped_gold_fields(records: list[PromptRecord]) -> list[str]:
    """Fields that look like gold answers but reached no verifier: the records have no task
    (nothing mapped to `answer`, `test` or `task`) yet carry one of these columns. A stage
    reports them at start, since its verifiers will not check those answers."""
    loose = [r for r in records if r.task is None]
    return [k for k in GOLD_LIKE if any(k in r.columns for r in loose)]


def synthetic_prompts(n: int, seed: int = 0, **level) -> list[PromptRecord]:
    """Prompts of the embedded arithmetic task; `level` is make_problems' min_ops / max_ops /
    max_operand (the demo's SFT level is easier than the default)."""
    from posttrain.embedded import make_problems

    return [PromptRecord(p.id, p.question, "math", {"answer": p.answer, "reference": "\n".join(p.steps)})
            for p in make_problems(n, seed=seed, **level)]


def source_path(source: str) -> Path | None:
    """The local file or directory a prompt source reads, if it reads one."""
    if source in RECIPES:
        return shared_data_dir() / RECIPES[source][0]
    return Path(source) if source != "synthetic" and not source.startswith("hf:") else None


def load_prompts(source: str, fields: FieldMap | None = None, limit: int | None = None,
                 seed: int = 0) -> tuple[list[PromptRecord], list[dict]]:
    """(usable records, rejects as {"source", "line", "id", "reason"}) from a recipe or a file."""
    if source == "synthetic":
        return synthetic_prompts(limit or 256, seed=seed), []
    if source in RECIPES:
        filename, recipe_fields = RECIPES[source]
        path = shared_data_dir() / filename
        if not path.exists():
            raise FileNotFoundError(f"recipe {source!r} reads {path}, which is missing "
                                    "(set POSTTRAIN_SHARED_DATA to the directory that holds it)")
        fields, name, table = fields or recipe_fields, source, read_jsonl(path)
    else:
        fields, name, table = fields or FieldMap(), Path(source).stem or "prompts", read_table(source)
    records, rejects, seen = [], [], set()
    for n, rec, why in table:
        if rec is not None:
            prompt, why = _convert(n, rec, fields, name)
            if prompt is not None and prompt.id in seen:
                prompt, why = None, f"duplicate id {prompt.id!r}"
            if prompt is not None:
                seen.add(prompt.id)
                records.append(prompt)
                if limit and len(records) >= limit:
                    break
                continue
        rejects.append({"source": name, "line": n, "reason": why})
    return records, rejects
