"""The one training loop: SFT, reward-model training and GRPO all run through `Trainer`.

    trainer = Trainer(model, cfg, loss_fn, tokenizer=tok, args=model_args)
    trainer.fit(rows)                       # rows: a datasets.Dataset (or list) of examples

`loss_fn(model, batch) -> (loss, metrics)` is the only stage-specific piece. The loop owns:
accelerate (devices, mixed precision, multi-process), AdamW (fp32 master weights, optional
bf16 moments), warmup + cosine to a floor, gradient accumulation and clipping, the MoE bias
update after each optimizer step, skipping (and logging) steps whose loss or gradient is
not finite, atomic checkpoints with optimizer, scheduler, RNG and data position, exact
resume, and metrics to jsonl / TensorBoard / W&B with a progress bar.

Data order is a pure function of (seed, epoch): each epoch is a seeded permutation of the
rows cut into micro-batches, and the checkpoint stores how many micro-batches were used,
so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posttrain.model.moe import update_router_bias

from .config import TrainConfig
from .optim import build_optimizer, build_scheduler

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]


def process_state():
    """accelerate's process state. Without a GPU it must be told so (cpu=True), or a torchrun
    launch runs N unsynchronised single-process copies (gloo is then used between them)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


class _Dispatch(torch.nn.Module):
    """DDP synchronises gradients only for work done inside the wrapped module's forward(),
    while the stages call the core's `compute` / `score_sequences` / ...; so forward takes the
    method's name. The loss function sees a `_Caller` and writes `model.compute(...)` as usual."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, method: str, *args, **kwargs):
        return getattr(self.model, method)(*args, **kwargs)


class _Caller:
    """What loss functions receive: method calls go through the prepared (possibly DDP) module's
    forward; other attributes come from the model itself."""

    # read what the last forward stored, using no parameter: a second pass through DDP's
    # forward before backward would mark every parameter it did not touch ready twice
    DIRECT = frozenset({"balance_loss"})

    def __init__(self, prepared: torch.nn.Module, model: torch.nn.Module):
        self._prepared, self._model = prepared, model

    def __getattr__(self, name: str):
        attr = getattr(self._model, name)
        if name in self.DIRECT:
            return attr
        if callable(attr) and not isinstance(attr, torch.nn.Module):
            return lambda *args, **kwargs: self._prepared(name, *args, **kwargs)
        return attr


class BatchPlan:
    """Which rows form micro-batch i: epoch-seeded permutations, cut into equal chunks."""

    def __init__(self, n_rows: int, batch_size: int, seed: int, world: int = 1, rank: int = 0):
        if n_rows < batch_size * world:
            raise ValueError(f"{n_rows} rows are fewer than one global batch ({batch_size} x {world} processes)")
        self.n_rows, self.batch_size, self.seed, self.world, self.rank = n_rows, batch_size, seed, world, rank
        self.per_epoch = n_rows // (batch_size * world)  # the incomplete tail of an epoch is not used
        self._perm_epoch, self._perm = -1, None

    def rows(self, micro_batch: int) -> list[int]:
        epoch, k = divmod(micro_batch, self.per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
            self._perm_epoch = epoch
        start = (k * self.world + self.rank) * self.batch_size
        return self._perm[start:start + self.batch_size].tolist()


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLog:
    def __init__(self, out: Path, cfg: TrainConfig, resume_step: int, is_main: bool, run_config: dict):
        self.is_main = is_main
        self.path = out / "metrics.jsonl"
        self.tb = self.wandb = None
        if not is_main:
            return
        if self.path.exists():  # steps after the checkpoint we resume from will be logged again
            kept = [l for l in self.path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        self.file = open(self.path, "a") if "jsonl" in cfg.report_to else None
        if "tensorboard" in cfg.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                self.tb = None
        if "wandb" in cfg.report_to:
            try:
                import wandb

                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "posttrain"), config=run_config,
                                        dir=str(out), resume="allow")
            except ImportError:
                self.wandb = None

    def log(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        row = {"step": step, **metrics}
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(row, step=step)

    def close(self) -> None:
        if self.is_main:
            if self.file:
                self.file.close()
            if self.tb:
                self.tb.close()
            if self.wandb:
                self.wandb.finish()


class Trainer:
    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, loss_fn: LossFn, collate: Callable[[list], dict],
                 run_config: dict | None = None):
        from accelerate import Accelerator

        self.cfg, self.loss_fn, self.collate = cfg, loss_fn, collate
        self.run_config = run_config or {}
        self.out = Path(cfg.out_dir)
        from accelerate.utils import DistributedDataParallelKwargs

        # a routed expert may see no token in a micro-batch: its parameters get no gradient there
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        torch.manual_seed(cfg.seed)
        self.model = model       # the model being trained (a peft model with LoRA)
        if cfg.fp8:  # before the optimizer: the switch is in place, parameters are unchanged
            from posttrain.model.fp8_training import enable_fp8_training
            enable_fp8_training(model)
        self.optimizer = build_optimizer(model, cfg)
        self.prepared, self.optimizer = self.accelerator.prepare(_Dispatch(model), self.optimizer)
        self.caller = _Caller(self.prepared, model)
        self.step = 0            # optimizer steps taken (including skipped ones)
        self.micro = 0           # micro-batches consumed
        self.skipped = 0

    # ------------------------------------------------------------- checkpoints
    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_dir / "latest"
        if pointer.exists():
            path = self.ckpt_dir / pointer.read_text().strip()
            if (path / "state.json").exists():
                return path
        return None

    def save(self) -> Path:
        """Write the full training state under a temporary name, then rename; update `latest`."""
        self.accelerator.wait_for_everyone()
        path = self.ckpt_dir / f"step-{self.step:08d}"
        if self.accelerator.is_main_process:
            tmp = self.ckpt_dir / f".step-{self.step:08d}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save(self.model.state_dict(), tmp / "model.pt")
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps({"step": self.step, "micro": self.micro,
                                                        "skipped": self.skipped, "config": self.run_config}))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
            pointer_tmp = self.ckpt_dir / f".latest.tmp-{os.getpid()}"
            pointer_tmp.write_text(path.name)
            os.replace(pointer_tmp, self.ckpt_dir / "latest")
            for old in sorted(self.ckpt_dir.glob("step-*"))[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return path

    def load(self, path: Path) -> None:
        self.model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
        state = json.loads((path / "state.json").read_text())
        self.step, self.micro, self.skipped = state["step"], state["micro"], state["skipped"]

    # -------------------------------------------------------------------- fit
    def total_steps(self, plan: BatchPlan) -> int:
        if self.cfg.max_steps:
            return self.cfg.max_steps
        return max(1, int(self.cfg.epochs * plan.per_epoch) // self.cfg.grad_accum)

    def optimizer_step(self, micro_batches, n_micro: int) -> tuple[dict, float, bool, dict, int]:
        """One optimizer step over `n_micro` collated micro-batches (gradients accumulated,
        synchronised across processes on the last one): clipping, a skip when the loss or the
        gradient is not finite, the scheduler, the MoE bias update. Returns (mean metrics,
        grad norm, finite, expert loads, input tokens). GRPO calls this with its own batches."""
        cfg, acc, model = self.cfg, self.accelerator, self.prepared
        sums: dict[str, float] = {}
        finite, tokens = True, 0
        for k, batch in enumerate(micro_batches):
            batch = {key: v.to(acc.device) if torch.is_tensor(v) else v for key, v in batch.items()}
            with acc.autocast():
                loss, metrics = self.loss_fn(self.caller, batch)
            if not torch.isfinite(loss):
                finite = False
            if finite:
                ctx = acc.no_sync(model) if k < n_micro - 1 else _null()
                with ctx:
                    acc.backward(loss / n_micro)
            for key, v in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(v) / n_micro
            tokens += int(metrics.get("tokens", 0))
        grad_norm = float("nan")
        if finite:
            if cfg.max_grad_norm:
                grad_norm = float(acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
            else:
                grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                          if p.grad is not None])))
            finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            loads = update_router_bias(self.model, cfg.bias_update_gamma)
        else:
            self.skipped += 1
            loads = update_router_bias(self.model, 0.0)  # drop this step's counts
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return sums, grad_norm, finite, loads, tokens

    def fit(self, rows, resume: bool = True) -> dict:
        cfg, acc = self.cfg, self.accelerator
        plan = BatchPlan(len(rows), cfg.batch_size, cfg.seed, acc.num_processes, acc.process_index)
        total = self.total_steps(plan)
        self.scheduler = build_scheduler(self.optimizer, cfg, total)
        latest = self.latest_checkpoint() if resume else None
        if latest is not None:
            self.load(latest)
        self.out.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(self.out, cfg, self.step, acc.is_main_process, self.run_config)
        model = self.prepared
        model.train()
        from tqdm import tqdm

        bar = tqdm(total=total, initial=self.step, desc="train", disable=not (cfg.progress and acc.is_main_process))
        t_start, tokens_since, t_since = time.perf_counter(), 0, time.perf_counter()
        tokens_total, steps_start = 0, self.step
        try:
            while self.step < total:
                def micro_batches():
                    for _ in range(cfg.grad_accum):
                        batch = self.collate([rows[i] for i in plan.rows(self.micro)])
                        self.micro += 1
                        yield batch

                sums, grad_norm, finite, loads, tokens = self.optimizer_step(micro_batches(), cfg.grad_accum)
                tokens_since += tokens
                tokens_total += tokens
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == total or not finite:
                    elapsed = time.perf_counter() - t_since
                    row = {**sums, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                           "tokens_per_s": tokens_since / elapsed if elapsed > 0 else 0.0,
                           "skipped_nonfinite": self.skipped}
                    if loads:
                        row["expert_load_max_over_mean"] = max(loads.values())
                    if not finite:
                        row["nonfinite_step"] = True
                    log.log(self.step, row)
                    bar.set_postfix(loss=f"{sums.get('loss', float('nan')):.4f}")
                    tokens_since, t_since = 0, time.perf_counter()
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < total:
                    self.save()
            self.save()
        finally:
            bar.close()
            log.close()
        wall = time.perf_counter() - t_start
        # throughput of this process over this call (a resumed run counts only its own steps)
        return {"steps": self.step, "steps_run": self.step - steps_start, "skipped_nonfinite": self.skipped,
                "wall_s": wall, "tokens": tokens_total, "tokens_per_s": tokens_total / wall if wall > 0 else 0.0}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def lm_loss(mtp_weight: float) -> LossFn:
    """SFT's loss: next-token CE on labelled tokens + mtp_weight * mean MTP CE + balance loss."""

    def fn(model, batch):
        out = model.compute(batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"),
                            segment_ids=batch.get("segment_ids"), return_logits=False)
        loss = out.loss
        seg = batch.get("segment_ids")
        metrics: dict[str, Any] = {
            "ce": out.loss.detach(),
            "loss_tokens": int((batch["labels"] != -100).sum()),
            # input tokens processed (padding excluded): what throughput is measured in
            "tokens": int((seg >= 0).sum()) if seg is not None else batch["input_ids"].numel(),
        }
        if out.mtp_losses:
            mtp = torch.stack(out.mtp_losses).mean()
            loss = loss + mtp_weight * mtp
            for d, l in enumerate(out.mtp_losses):
                metrics[f"mtp_{d}"] = l.detach()
        if out.balance_loss is not None:
            loss = loss + out.balance_loss
            metrics["balance"] = out.balance_loss.detach()
        metrics["loss"] = loss.detach()
        return loss, metrics

    return fn
