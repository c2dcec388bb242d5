"""`posttrain rm eval --model DIR --data FILE`: how well a reward model ranks preference pairs.

Reports pairwise accuracy overall and per `subset` (with RewardBench's sections and weighting
when the subsets are RewardBench's), the score distributions of chosen and rejected answers,
and writes to the output directory: summary.json, scores.jsonl (one line per scored pair),
skipped.jsonl (each pair that could not be scored, with the reason) and report.png (score
histograms and accuracy by subset).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.config import setting
from posttrain.errors import all_rejected
from posttrain.outputs import claim_output
from posttrain.stages.common import local_inputs, require

from data_recipes.preference_data import PairFields, PreferencePair, load_pairs, tokenize_pairs
from posttrain.io_utils import atomic_write_json, atomic_write_text
from reward.bradley_terry import pairwise_accuracy
from reward.model_reward import RewardModelScorer
from reward.rewardbench import is_rewardbench, section_scores


def _distribution(values: list[float]) -> dict:
    if not values:
        return {}
    qs = statistics.quantiles(values, n=10) if len(values) > 1 else [values[0]] * 9
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "min": min(values),
            "p10": qs[0], "median": statistics.median(values), "p90": qs[-1], "max": max(values)}


def _plot(path: Path, chosen: list[float], rejected: list[float], per_subset: dict[str, dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    lo, hi = min(chosen + rejected), max(chosen + rejected)
    bins = [lo + (hi - lo) * i / 40 for i in range(41)] if hi > lo else 20
    ax1.hist(chosen, bins=bins, alpha=0.6, label=f"chosen (mean {statistics.fmean(chosen):.2f})", color="tab:green")
    ax1.hist(rejected, bins=bins, alpha=0.6, label=f"rejected (mean {statistics.fmean(rejected):.2f})",
             color="tab:red")
    ax1.set_xlabel("reward score")
    ax1.set_ylabel("pairs")
    ax1.set_title("score distributions")
    ax1.legend()
    names = list(per_subset)
    ax2.barh(names, [per_subset[n]["accuracy"] for n in names], color="tab:blue")
    ax2.set_xlim(0, 1)
    ax2.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax2.set_xlabel("pairwise accuracy")
    ax2.set_title("accuracy by subset")
    for i, n in enumerate(names):
        ax2.text(min(per_subset[n]["accuracy"] + 0.01, 0.9), i, f"{per_subset[n]['accuracy']:.3f} (n={per_subset[n]['pairs']})",
                 va="center")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def evaluate(model, tokenizer, pairs: list[PreferencePair], out: Path, max_length: int = 2048,
             overlong: str = "drop", batch_size: int = 16, rejects: list[dict] | None = None,
             title: str = "reward model evaluation") -> dict:
    """Score every pair, write the report files to `out`, return the summary."""
    out.mkdir(parents=True, exist_ok=True)
    scorer = RewardModelScorer(batch_size=batch_size, max_length=max_length, model=model, tokenizer=tokenizer)
    tokenized, skipped, counts = tokenize_pairs(tokenizer, pairs, max_length, overlong)
    skipped = list(rejects or []) + skipped
    seqs = [t.chosen_ids for t in tokenized] + [t.rejected_ids for t in tokenized]
    scores = scorer.score_ids(seqs)
    n = len(tokenized)
    chosen, rejected = scores[:n], scores[n:]
    by_subset: dict[str, list[int]] = {}
    lines = []
    for i, t in enumerate(tokenized):
        by_subset.setdefault(t.pair.subset or "all", []).append(i)
        lines.append(json.dumps({"id": t.pair.id, "subset": t.pair.subset, "chosen_score": chosen[i],
                                 "rejected_score": rejected[i], "correct": chosen[i] > rejected[i],
                                 "truncated": t.truncated}) + "\n")
    per_subset = {name: {"pairs": len(idx), "accuracy": pairwise_accuracy([chosen[i] for i in idx],
                                                                          [rejected[i] for i in idx])}
                  for name, idx in sorted(by_subset.items())}
    summary = {
        "pairs": n, "skipped": len(skipped), "truncated": counts.get("truncated", 0),
        "accuracy": pairwise_accuracy(chosen, rejected) if n else None,
        "ties": sum(c == r for c, r in zip(chosen, rejected)),
        "per_subset": per_subset,
        "chosen_scores": _distribution(chosen), "rejected_scores": _distribution(rejected),
        "mean_gap": statistics.fmean(c - r for c, r in zip(chosen, rejected)) if n else None,
    }
    if is_rewardbench(by_subset):
        summary["rewardbench"] = section_scores({k: v["accuracy"] for k, v in per_subset.items()})
    atomic_write_text(out / "scores.jsonl", "".join(lines))
    atomic_write_text(out / "skipped.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped))
    if n:
        _plot(out / "report.png", chosen, rejected, per_subset, title)
    atomic_write_json(out / "summary.json", summary)
    return summary


@dataclass
class RMEvalConfig:
    model: str | None = None           # a reward-model checkpoint directory (with score.weight)
    data: str | None = None            # pairs: jsonl(.gz), parquet, HF dataset dir, hf:NAME
    output_dir: str | None = None      # default: <model>-eval/<data name>, beside the model
    fields: PairFields = field(default_factory=PairFields)
    max_length: int | None = setting(None, ge=2)   # default: the length the model was trained with
    overlong: str = setting("drop", choices=("drop", "truncate"))
    batch_size: int = setting(16, ge=1)
    limit: int | None = setting(None, ge=1)        # score only the first N pairs


def run_rm_eval_stage(cfg: RMEvalConfig, overwrite: bool = False, restart: bool = False) -> dict:
    require(cfg, "model", "data")
    model = Path(cfg.model)
    out = Path(cfg.output_dir) if cfg.output_dir else model.parent / f"{model.name}-eval" / Path(cfg.data).name.split(".")[0]
    scorer = RewardModelScorer(cfg.model, batch_size=cfg.batch_size, max_length=cfg.max_length)
    claim_output("rm eval", out, cfg, local_inputs(cfg.model, cfg.data), overwrite=overwrite, restart=restart)
    pairs, rejects = load_pairs(cfg.data, cfg.fields, cfg.limit)
    summary = evaluate(scorer.model, scorer.tokenizer, pairs, out, max_length=scorer.max_length,
                       overlong=cfg.overlong, batch_size=cfg.batch_size, rejects=rejects,
                       title=f"{model.name} on {Path(cfg.data).name}")
    if not summary["pairs"]:
        raise all_rejected("pairs", summary["skipped"], out / "skipped.jsonl")
    return summary

