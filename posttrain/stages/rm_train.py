"""`posttrain rm train --config configs/rm/X.yaml key=value ...`: a Bradley-Terry reward model.

The core's trunk with the scalar head (score read at the last real token), started from an
SFT checkpoint (HF directory; the LM head is kept in the checkpoint but unused) or from a
config, trained with LoRA or fully through the shared Trainer (resume, metrics, progress).
Writes `<output_dir>/final` (HF checkpoint with `score.weight`, tokenizer, reward_model.json),
`<output_dir>/data_stats.json` (pairs read, skipped and why) and, with held-out pairs,
`<output_dir>/eval/` (the `rm eval` report).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from data_recipes.preference_data import (PairFields, PreferencePair, collate_pairs, load_pairs,
                                          pairs_from_distillation, tokenize_pairs)
from posttrain.config import build, setting
from posttrain.errors import all_rejected
from posttrain.io_utils import atomic_write_json, atomic_write_text
from posttrain.model import save_checkpoint
from posttrain.model.args import ConfigError
from posttrain.stages.sft import (LoraSection, ModelSection, apply_lora, claim_training_output, load_model,
                                  load_tokenizer)
from posttrain.train.config import TrainConfig
from posttrain.train.loop import Trainer
from reward.bradley_terry import bt_loss
from reward.model_reward import META_FILE


@dataclass
class PairSource:
    path: str                       # jsonl(.gz) / parquet / HF dataset dir / hf:NAME, or distill:DIR
    fields: PairFields = field(default_factory=PairFields)
    limit: int | None = setting(None, ge=1)


@dataclass
class RMDataSection:
    train: list[PairSource] = field(default_factory=list)
    eval: list[PairSource] = field(default_factory=list)
    eval_fraction: float = setting(0.0, ge=0, lt=1)  # held out from train when no eval source is given
    max_length: int = setting(2048, ge=2)
    overlong: str = setting("drop", choices=("drop", "truncate"))  # truncate: cut the prompt's oldest tokens


@dataclass
class RMLossSection:
    use_margin: bool = True         # subtract the pair's `margin` column when present
    center_coef: float = setting(0.0, ge=0)  # + coef * mean((r_c + r_r)^2)


@dataclass
class RMConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: RMDataSection = field(default_factory=RMDataSection)
    loss: RMLossSection = field(default_factory=RMLossSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_batch_size: int = setting(16, ge=1)
    output_dir: str = "runs/rm"


RM_IGNORES = TrainConfig.RESUME_IGNORES + ("eval_batch_size",)


def rm_config(data: dict) -> RMConfig:
    return check_rm(build(RMConfig, data))


def check_rm(cfg: RMConfig) -> RMConfig:
    cfg.train.out_dir = cfg.output_dir
    if not cfg.data.train:
        raise ConfigError("data.train is empty: list at least one {path} of preference pairs")
    if not (cfg.model.path or cfg.model.config):
        raise ConfigError("model.path (an SFT checkpoint) or model.config (a config.json) is required")
    return cfg


def read_source(src: PairSource) -> tuple[list[PreferencePair], list[dict]]:
    if src.path.startswith("distill:"):
        pairs = pairs_from_distillation(src.path[len("distill:"):])
        return (pairs[:src.limit] if src.limit else pairs), []
    return load_pairs(src.path, src.fields, src.limit)


def rm_loss(use_margin: bool, center_coef: float):
    """BT loss on a batch of [chosen rows; rejected rows] + the MoE balance loss."""

    def fn(model, batch):
        scores = model.score_sequences(batch["input_ids"], batch["attention_mask"])
        half = scores.shape[0] // 2
        loss, metrics = bt_loss(scores[:half], scores[half:], batch["margin"] if use_margin else None, center_coef)
        metrics["bt_loss"] = float(loss.detach())
        balance = model.balance_loss()
        if balance is not None:
            loss = loss + balance
            metrics["balance"] = float(balance.detach())
        metrics["loss"] = float(loss.detach())
        metrics["tokens"] = int(batch["attention_mask"].sum())
        return loss, metrics

    return fn


def _gather(sources: list[PairSource]) -> tuple[list[PreferencePair], list[dict]]:
    pairs, rejects = [], []
    for src in sources:
        p, r = read_source(src)
        pairs += p
        rejects += r
    return pairs, rejects


def run_rm_train(cfg: RMConfig, overwrite: bool = False, restart: bool = False) -> dict:
    check_rm(cfg)
    claim_training_output("rm train", cfg, [s.path for s in cfg.data.train + cfg.data.eval] +
                          [cfg.model.path, cfg.model.config], overwrite, restart, RM_IGNORES)
    torch.manual_seed(cfg.train.seed)
    model, args = load_model(cfg.model, scalar_head=True)
    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.path, args.vocab_size)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    train_pairs, rejects = _gather(cfg.data.train)
    eval_pairs, eval_rejects = _gather(cfg.data.eval)
    if not eval_pairs and cfg.data.eval_fraction:
        shuffled = train_pairs[:]
        random.Random(cfg.train.seed).shuffle(shuffled)
        n_eval = max(1, int(round(cfg.data.eval_fraction * len(shuffled))))
        eval_pairs, train_pairs = shuffled[:n_eval], shuffled[n_eval:]
    train_tok, skipped, counts = tokenize_pairs(tokenizer, train_pairs, cfg.data.max_length, cfg.data.overlong)
    skipped_all = rejects + eval_rejects + skipped
    atomic_write_text(out / "skipped_pairs.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n"
                                                           for s in skipped_all))
    if not train_tok:
        raise all_rejected("training pairs", len(rejects) + len(skipped), out / "skipped_pairs.jsonl")
    stats = {"pairs_train": len(train_tok), "pairs_eval": len(eval_pairs), "unreadable": len(rejects) + len(eval_rejects),
             "tokenize": counts, "max_length": cfg.data.max_length, "overlong_action": cfg.data.overlong}
    atomic_write_json(out / "data_stats.json", stats)

    # the new head is not a LoRA target: it is trained fully and saved with the adapter
    trained = apply_lora(model, cfg.lora, modules_to_save=["score"]) if cfg.lora.enabled else model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = Trainer(trained, cfg.train, rm_loss(cfg.loss.use_margin, cfg.loss.center_coef),
                      lambda rows: collate_pairs(rows, pad), run_config=asdict(cfg))
    result = trainer.fit(train_tok)
    final_dir = out / "final"
    final = trainer.model
    if cfg.lora.enabled:
        if trainer.is_main:
            final.save_pretrained(str(out / "adapter"))
            final = final.merge_and_unload()
            save_checkpoint(final, args, final_dir, tokenizer=tokenizer)
    else:  # every process takes part: a sharded model is gathered as it is written
        trainer.export(final_dir, args, tokenizer=tokenizer)
    if trainer.is_main:
        atomic_write_json(final_dir / META_FILE, {"max_length": cfg.data.max_length, "kind": "bradley_terry",
                                                   "pairs_train": len(train_tok)})
    report = None
    if eval_pairs and trainer.is_main:
        from posttrain.stages.rm_eval import evaluate

        if trainer.sharded:  # the trained weights are spread over the processes: evaluate the export
            from posttrain.model import load_checkpoint
            final = load_checkpoint(final_dir, dtype=getattr(torch, cfg.model.dtype))[0]
        final.eval()
        report = evaluate(final, tokenizer, eval_pairs, out / "eval", max_length=cfg.data.max_length,
                          overlong=cfg.data.overlong, batch_size=cfg.eval_batch_size)
    return {**result, "data": stats, "final": str(final_dir),
            "eval": {k: report[k] for k in ("accuracy", "pairs", "skipped")} if report else None}
