"""`posttrain distill generate`: N teacher samples per prompt, sharded and resumable.

Prompts are cut into fixed chunks in input order; each chunk becomes one shard file, written
under a temporary name and renamed when the whole chunk is done. A run killed at any point
and started again with the same settings skips the finished shards and redoes only the
chunk that was in flight, so the output holds every (prompt, sample) exactly once. Each
prompt's seed derives from the run seed and the prompt id, so a redone chunk reproduces
the same samples. A manifest pins the settings: rerunning into the same directory with
different ones is an error instead of a silent mix.

Output directory:
    manifest.json            settings, prompt count, teacher
    shards/gen-00000.jsonl   one record per (prompt, sample)
    shards/errors-00000.jsonl  prompts of that chunk the engine could not serve, with the error
    prompt_rejects.jsonl     prompts that could not be used, with the reason
    summary.json             counts
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from data_recipes.prompt_sets import FieldMap, PromptRecord, load_prompts, source_path, unmapped_gold_fields
from data_recipes.r1_prompts import R1_SYSTEM_PROMPT, build_messages
from posttrain.config import setting
from posttrain.engines import EngineConfig, make_engine
from posttrain.engines.base import Engine, EngineError, SamplingConfig, prompt_seed, sample_seed
from posttrain.errors import all_rejected
from posttrain.io_utils import atomic_write_json, atomic_write_text
from posttrain.outputs import claim_output
from posttrain.stages.common import local_inputs, require, say, text_option


@dataclass
class PromptSource:
    source: str | None = None          # recipe (gsm8k, gsm8k-test, math500, humaneval, synthetic),
    #                                    .jsonl / .parquet, a saved HF dataset directory, or hf:NAME
    fields: FieldMap | None = None     # where each field lives in a file (default: the problem in `problem`)
    limit: int | None = setting(None, ge=1)


@dataclass
class GenerateConfig:
    prompts: PromptSource = field(default_factory=PromptSource)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=4, max_tokens=2048))
    system_prompt: str | None = "r1"   # "r1": the R1-style prompt; other text, @FILE, or null for none
    chunk_size: int = setting(64, ge=1)
    output_dir: str | None = None


# how the teacher is reached, not what it writes: a rerun may change these and still resume
GENERATE_IGNORES = ("engine.concurrency", "engine.rps", "engine.latency", "engine.api_key_env")


def run_generate(cfg: GenerateConfig, overwrite: bool = False, restart: bool = False, progress: bool = True) -> dict:
    """The `distill generate` stage from its config: the output claimed (posttrain/outputs.py),
    then `generate`."""
    require(cfg, "prompts.source", "output_dir")
    system = R1_SYSTEM_PROMPT if cfg.system_prompt == "r1" else text_option(cfg.system_prompt, "system_prompt")
    out = Path(cfg.output_dir)
    claim = claim_output("distill generate", out, cfg, local_inputs(source_path(cfg.prompts.source)),
                         overwrite=overwrite, restart=restart, ignore=GENERATE_IGNORES)
    if claim.state == "restart":
        remove_generated(out)
    prompts, rejects = load_prompts(cfg.prompts.source, cfg.prompts.fields, cfg.prompts.limit, cfg.sampling.seed)
    if not prompts:
        atomic_write_text(out / "prompt_rejects.jsonl", "".join(json.dumps(r) + "\n" for r in rejects))
        raise all_rejected("prompts", len(rejects), out / "prompt_rejects.jsonl")
    gold = unmapped_gold_fields(prompts)
    if gold:
        say(f"distill generate: the prompts carry {', '.join(gold)} but no field is mapped to answer or test, so "
            f"`distill filter` will not verify these samples; map it with prompts.fields.answer={gold[0]} "
            f"(--map answer={gold[0]})")
    summary = generate(prompts, make_engine(cfg.engine), cfg.sampling, out, system, cfg.chunk_size, rejects,
                       progress=progress)
    if gold:
        summary["unmapped_gold_fields"] = gold
        atomic_write_json(out / "summary.json", summary)
    return summary


def remove_generated(out: Path) -> None:
    """A restart: the files a generation run writes, and nothing else."""
    for pattern in ("shards/gen-*.jsonl", "shards/errors-*.jsonl", "shards/.gen-*.tmp-*", "manifest.json",
                    "summary.json", "prompt_rejects.jsonl"):
        for path in out.glob(pattern):
            path.unlink()


class ManifestMismatch(RuntimeError):
    """The output directory holds a run with different settings."""


def _fingerprint(prompts: list[PromptRecord], sampling: SamplingConfig, system_prompt: str | None,
                 chunk_size: int, teacher: dict) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.id, p.problem, p.task, p.columns], sort_keys=True).encode())
    h.update(json.dumps([sampling.as_dict(), system_prompt, chunk_size, teacher], sort_keys=True).encode())
    return h.hexdigest()


def _records(chunk: list[PromptRecord], messages: list[list[dict]], samples, sampling: SamplingConfig,
             seeds: list[int], teacher: dict, system_prompt: str | None) -> Iterator[dict]:
    for rec, msgs, outs, seed in zip(chunk, messages, samples, seeds):
        for j, s in enumerate(outs or []):  # None: the engine failed this prompt
            yield {
                "id": f"{rec.id}#{j}", "prompt_id": rec.id, "sample_idx": j, "task": rec.task,
                "problem": rec.problem, "messages": msgs, "system_prompt": system_prompt, "completion": s.text,
                "finish_reason": s.finish_reason, "completion_tokens": len(s.token_ids),
                "teacher": teacher, "sampling": sampling.as_dict(), "seed": sample_seed(seed, j),
                **rec.columns,
            }


def _too_long(engine: Engine, msgs: list[dict], sampling: SamplingConfig) -> str | None:
    """Reason a prompt cannot fit the engine's context, when the engine can tell."""
    limit = getattr(engine, "max_model_len", None)
    if limit is None or not hasattr(engine, "prompt_ids"):
        return None
    n = len(engine.prompt_ids(msgs))
    if n + sampling.max_tokens > limit:
        return f"prompt of {n} tokens + max_tokens {sampling.max_tokens} exceeds the engine's context of {limit}"
    return None


def generate(prompts: list[PromptRecord], engine: Engine, sampling: SamplingConfig, out: Path,
             system_prompt: str | None = R1_SYSTEM_PROMPT, chunk_size: int = 64,
             prompt_rejects: list[dict] | None = None, progress: bool = True) -> dict:
    sampling.validate()
    out.mkdir(parents=True, exist_ok=True)
    shards = out / "shards"
    shards.mkdir(exist_ok=True)
    clean_stale_temporaries(out)
    teacher = engine.describe()
    fingerprint = _fingerprint(prompts, sampling, system_prompt, chunk_size, teacher)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("fingerprint") != fingerprint:
            raise ManifestMismatch(f"{out} holds a generation run with other prompts or settings; "
                                   "use a new output directory, or --restart to start over")
    else:
        atomic_write_json(manifest_path, {
            "fingerprint": fingerprint, "prompts": len(prompts), "chunk_size": chunk_size,
            "sampling": sampling.as_dict(), "system_prompt": system_prompt, "teacher": teacher,
            # the template the teacher's prompts were rendered with, where the engine knows it
            "chat_template": getattr(getattr(engine, "tokenizer", None), "chat_template", None),
        })

    rejects = list(prompt_rejects or [])
    usable: list[tuple[PromptRecord, list[dict]]] = []
    for rec in prompts:
        msgs = build_messages(rec, system_prompt)
        why = _too_long(engine, msgs, sampling)
        if why:
            rejects.append({"id": rec.id, "reason": why})
        else:
            usable.append((rec, msgs))
    atomic_write_text(out / "prompt_rejects.jsonl", "".join(json.dumps(r) + "\n" for r in rejects))

    chunks = [usable[i:i + chunk_size] for i in range(0, len(usable), chunk_size)]
    done = resumed = 0
    with tqdm(total=len(chunks), desc="distill generate", unit="chunk", disable=not progress) as bar:
        for k, chunk in enumerate(chunks):
            path = shards / f"gen-{k:05d}.jsonl"
            if path.exists():
                resumed += 1
                bar.update(1)
                continue
            recs = [r for r, _ in chunk]
            messages = [m for _, m in chunk]
            seeds = [prompt_seed(sampling.seed, r.id) for r in recs]
            samples, errors = _generate_chunk(engine, recs, messages, sampling, seeds)
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n"
                            for r in _records(recs, messages, samples, sampling, seeds, teacher, system_prompt))
            # the errors file first: a finished shard always has its errors beside it
            atomic_write_text(shards / f"errors-{k:05d}.jsonl", "".join(json.dumps(e) + "\n" for e in errors))
            atomic_write_text(path, lines)
            done += 1
            bar.update(1)
    engine_errors = [json.loads(l) for p in sorted(shards.glob("errors-*.jsonl")) for l in p.read_text().splitlines()]
    generated = sum(1 for _ in iter_generated(out))
    finish = Counter(r["finish_reason"] for r in iter_generated(out))
    summary = {"prompts": len(prompts), "prompts_used": len(usable), "prompts_rejected": len(rejects),
               "reject_reasons": dict(Counter(r["reason"] for r in rejects)), "samples": generated,
               "finish_reasons": dict(finish), "engine_errors": len(engine_errors),
               "shards": len(chunks), "shards_written": done,
               "shards_resumed": resumed, "teacher": teacher}
    atomic_write_json(out / "summary.json", summary)
    return summary


def _generate_chunk(engine: Engine, recs, messages, sampling, seeds):
    """Samples for a chunk; if the engine fails on it, prompt by prompt so that one bad
    prompt (say, one the server rejects) costs only itself. Returns (samples, errors)."""
    try:
        return engine.generate(messages, sampling, seeds), []
    except EngineError:
        samples, errors = [], []
        for rec, msgs, seed in zip(recs, messages, seeds):
            try:
                samples.append(engine.generate([msgs], sampling, [seed])[0])
            except EngineError as e:
                samples.append(None)
                errors.append({"id": rec.id, "reason": f"engine error: {e}"[:500]})
        return samples, errors


def iter_generated(out: Path) -> Iterator[dict]:
    """Every generated record, shard by shard, in prompt order."""
    for path in sorted((out / "shards").glob("gen-*.jsonl")):
        with open(path) as f:
            for line in f:
                yield json.loads(line)


def clean_stale_temporaries(out: Path) -> int:
    """Remove half-written shard files a killed run left behind (they are never read)."""
    n = 0
    for tmp in (out / "shards").glob(".gen-*.tmp-*"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n


__all__ = ["generate", "run_generate", "GenerateConfig", "iter_generated", "ManifestMismatch",
           "clean_stale_temporaries"]
