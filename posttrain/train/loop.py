"""The one training loop: SFT, reward-model training and GRPO all run through `Trainer.fit`.

    trainer = Trainer(model, cfg, loss_fn, collate)
    trainer.fit(rows)                       # rows: a datasets.Dataset (or list) of examples
    trainer.fit(source)                     # or any StepSource (GRPO's rollouts: rollout/steps.py)

`loss_fn(model, batch) -> (loss, metrics)` and the source of batches are the stage-specific
pieces (train/steps.py says what each may return). The loop owns:
accelerate (devices, mixed precision, multi-process), AdamW (fp32 master weights, optional
bf16 moments), warmup + cosine to a floor, gradient accumulation and clipping, the MoE bias
update after each optimizer step, skipping (and logging) steps whose loss or gradient is
not finite, atomic checkpoints with optimizer, scheduler, RNG and data position, exact
resume, and metrics to jsonl / TensorBoard / W&B with a progress bar.

Data order is the source's: for rows a pure function of (seed, epoch), each epoch a seeded
permutation cut into micro-batches. The checkpoint stores the source's position, so a resumed
run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
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

from posttrain.errors import DataError
from posttrain.io_utils import truncate_jsonl
from posttrain.outputs import OutputError, owned_by, remove_owned
from posttrain.model.kernels.selection import select as select_kernels
from posttrain.model.moe import RoutingSegments, routing_segments_of, update_router_bias

from .collective import all_gather, all_sum
from .config import TrainConfig
from .cpu_threads import cpu_threads
from .optim import build_optimizer, build_scheduler
from .steps import BatchPlan, LossParts, RowSteps, StepSource

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]
CHECKPOINT_MARKER = "posttrain-checkpoint"   # in each step-* directory this loop writes


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

    def __call__(self, *args, **kwargs):
        return self._prepared("forward", *args, **kwargs)

    def __getattr__(self, name: str):
        attr = getattr(self._model, name)
        if name in self.DIRECT:
            return attr
        if callable(attr) and not isinstance(attr, torch.nn.Module):
            return lambda *args, **kwargs: self._prepared(name, *args, **kwargs)
        return attr


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
        # steps after the checkpoint we resume from will be logged again
        truncate_jsonl(self.path, lambda row: row.get("step", 0) <= resume_step)
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

        self.sharded = cfg.sharded
        # a routed expert may see no token in a micro-batch: its parameters get no gradient there.
        # Sharded runs take their precision from FSDP's policy, not from autocast.
        self.accelerator = Accelerator(mixed_precision="no" if self.sharded else cfg.mixed_precision,
                                       cpu=not torch.cuda.is_available(),
                                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        torch.manual_seed(cfg.seed)
        select_kernels(cfg.kernels)  # which implementation runs each op, from the config
        self.model = model       # the model being trained (a peft model with LoRA)
        if cfg.fp8:  # before the optimizer: the switch is in place, parameters are unchanged
            from posttrain.model.fp8_training import enable_fp8_training
            enable_fp8_training(model)
        if cfg.activation_checkpointing:
            for block in getattr(model, "layers", []):
                block.activation_checkpointing = True
        if self.sharded:
            self._shard(model)  # before the optimizer: it must hold the sharded parameters
        self.optimizer = build_optimizer(model, cfg)
        if self.sharded:  # FSDP gathers around compute / score_* itself; no wrapper
            self.prepared = self.caller = model
        else:
            self.prepared, self.optimizer = self.accelerator.prepare(_Dispatch(model), self.optimizer)
            self.caller = _Caller(self.prepared, model)
        self.step = 0            # optimizer steps taken (including skipped ones)
        self.skipped = 0
        self.source: StepSource | None = None   # what fit() is consuming (its position is saved)

    def _to_device(self, batch: dict) -> dict:
        """The micro-batch on this process's device. Packed segment ids get their routing
        sequences worked out first, on the CPU copy, so the forward needs no host sync."""
        if torch.is_tensor(batch.get("segment_ids")) and "routing_segments" not in batch:
            batch = {**batch, "routing_segments": routing_segments_of(batch["segment_ids"])}
        dev = self.accelerator.device
        return {k: v.to(dev) if torch.is_tensor(v) else
                RoutingSegments(v.seq_N.to(dev), v.num_sequences) if isinstance(v, RoutingSegments) else v
                for k, v in batch.items()}

    def _shard(self, model: torch.nn.Module) -> None:
        """Expert parallelism + FSDP2 (posttrain.model.parallel) on the whole model, in place."""
        import torch.distributed as dist

        from posttrain.model.parallel import build_meshes, parallelize
        from posttrain.model.transformer import Transformer

        if not isinstance(model, Transformer):
            raise ValueError("train.expert_parallel / train.fsdp shard the core model itself; they do not "
                             "combine with LoRA (lora.enabled) yet: train LoRA with the default DDP layout")
        if not dist.is_initialized():  # one process, no launcher: a group of one
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        model.to(self.accelerator.device)
        self.layout = {"world": dist.get_world_size(), "expert_parallel": self.cfg.expert_parallel}
        parallelize(model, build_meshes(self.cfg.expert_parallel), self.cfg.mixed_precision,
                    self.cfg.activation_checkpointing)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def export(self, path: Path, args, tokenizer=None) -> Path | None:
        """The trained weights as an HF checkpoint at `path`, whatever the parallel layout.
        Every process must call it (a sharded model is gathered tensor by tensor); the main
        process writes. Returns the path on the main process, None elsewhere."""
        from posttrain.model import save_checkpoint
        from posttrain.model.checkpoint import hf_state_dict
        from posttrain.model.parallel import GatheredStateDict

        state = GatheredStateDict(self.model) if self.sharded else None
        if self.is_main:
            save_checkpoint(self.model, args, path, tokenizer=tokenizer, state_dict=state)
        elif state is not None:  # the writer walks hf_state_dict once; run the same gathers alongside it
            for _ in hf_state_dict(self.model, args, state):
                pass
        self.accelerator.wait_for_everyone()
        return Path(path) if self.is_main else None

    # ------------------------------------------------------------- checkpoints
    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_dir / "latest"
        if pointer.exists():
            path = self.ckpt_dir / pointer.read_text().strip()
            if (path / "state.json").exists() and owned_by(path, CHECKPOINT_MARKER):
                return path
        return None

    def remove_checkpoints(self) -> None:
        """Start over (a stage's --restart): remove this loop's checkpoints, nothing else."""
        if not self.accelerator.is_main_process or not self.ckpt_dir.is_dir():
            return
        for path in self.ckpt_dir.glob("step-*"):
            remove_owned(path, CHECKPOINT_MARKER)
        (self.ckpt_dir / "latest").unlink(missing_ok=True)

    def save(self) -> Path:
        """Write the full training state under a temporary name, then rename; update `latest`.

        A sharded run writes one model and one optimizer file per process (its shards and EP
        range), so it resumes only with the same layout; `export` writes the layout-free HF
        checkpoint."""
        acc = self.accelerator
        acc.wait_for_everyone()
        path = self.ckpt_dir / f"step-{self.step:08d}"
        # one temporary name for all processes (they may all write into it)
        tmp = self.ckpt_dir / f".step-{self.step:08d}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # this loop's own temporary name
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if self.sharded:
            rank = acc.process_index
            torch.save(_local(self.model.state_dict()), tmp / f"model-rank{rank:05d}.pt")
            torch.save(_local_optimizer_state(self.optimizer.state_dict()), tmp / f"optimizer-rank{rank:05d}.pt")
        elif acc.is_main_process:
            torch.save(self.model.state_dict(), tmp / "model.pt")
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            state = {"step": self.step, "skipped": self.skipped, "config": self.run_config,
                     "data": self.source.state_dict() if self.source is not None else {}}
            if self.sharded:
                state["layout"] = self.layout
            (tmp / "state.json").write_text(json.dumps(state))
            (tmp / CHECKPOINT_MARKER).write_text("written by posttrain's training loop\n")
            if path.exists() and not remove_owned(path, CHECKPOINT_MARKER):
                raise OutputError(f"{path} exists and is not a checkpoint of this loop; move it away")
            os.replace(tmp, path)
            pointer_tmp = self.ckpt_dir / f".latest.tmp-{os.getpid()}"
            pointer_tmp.write_text(path.name)
            os.replace(pointer_tmp, self.ckpt_dir / "latest")
            # rotation touches only checkpoints this loop wrote (they carry its marker)
            ours = sorted(p for p in self.ckpt_dir.glob("step-*") if owned_by(p, CHECKPOINT_MARKER))
            for old in ours[:-self.cfg.keep_checkpoints]:
                remove_owned(old, CHECKPOINT_MARKER)
        acc.wait_for_everyone()
        return path

    def load(self, path: Path) -> None:
        state = json.loads((path / "state.json").read_text())
        if self.sharded:
            layout = state.get("layout")
            if layout != self.layout:
                raise ValueError(
                    f"{path} was saved with parallel layout {layout or 'DDP (whole model)'}, this run is "
                    f"{self.layout}: training state resumes only in the same layout. Start a new run from "
                    "an exported HF checkpoint (model.path) instead, or relaunch with the saved layout.")
            rank = self.accelerator.process_index
            _load_local(self.model.state_dict(), torch.load(path / f"model-rank{rank:05d}.pt",
                                                            map_location="cpu", weights_only=True))
            saved = torch.load(path / f"optimizer-rank{rank:05d}.pt", map_location="cpu", weights_only=False)
            self.optimizer.load_state_dict(_distribute_optimizer_state(saved, self.optimizer))
        else:
            if state.get("layout"):
                raise ValueError(f"{path} holds a sharded run's state ({state['layout']}); resume it with "
                                 "the same train.expert_parallel / train.fsdp and number of processes")
            self.model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
        self.step, self.skipped = state["step"], state["skipped"]
        if self.source is not None:
            self.source.load_state_dict(state.get("data") or {"micro": state.get("micro", 0)})

    def _everywhere(self, flag: bool) -> bool:
        """True only if `flag` holds on every process (so all of them skip a step together)."""
        if self.accelerator.num_processes == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.accelerator.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t.item())

    # -------------------------------------------------------------------- fit
    def optimizer_step(self, micro_batches: list[dict]) -> tuple[dict, float, bool, dict, int]:
        """One optimizer step over this process's micro-batches of the step (gradients
        accumulated, synchronised across processes on the last one): the loss's normaliser
        (train/steps.py), clipping, a skip when the loss or the gradient is not finite, the
        scheduler, the MoE bias update. Returns (metrics, grad norm, finite, expert loads,
        input tokens). Every process must pass the same number of micro-batches."""
        cfg, acc, model = self.cfg, self.accelerator, self.prepared
        n_micro = len(micro_batches)
        scale = mean_scale = None
        if hasattr(self.loss_fn, "normaliser"):
            # the sums of every process's shares; gradients are then averaged over processes, so
            # each share is scaled by world / total for the step to be sum / total, and a mean
            # term by world / (micro-batches that carry one, on every process)
            counts = getattr(self.loss_fn, "counts_for_mean", lambda b: True)
            total, n_mean = all_sum([sum(float(self.loss_fn.normaliser(b)) for b in micro_batches),
                                     float(sum(bool(counts(b)) for b in micro_batches))])
            if total == 0:   # nothing to learn from on any process (e.g. every group's rewards equal)
                return self._empty_step()
            scale = acc.num_processes / total
            mean_scale = acc.num_processes / max(n_mean, 1.0)
        means: dict[str, float] = {}
        pairs: dict[str, list[float]] = {}
        finite, tokens = True, 0
        for k, batch in enumerate(micro_batches):
            batch = self._to_device(batch)
            last = k == n_micro - 1
            with acc.autocast():
                loss, metrics = self.loss_fn(self.caller, batch)
            if isinstance(loss, LossParts):
                term = loss.total * scale
                if loss.mean is not None:
                    term = term + loss.mean * mean_scale
                check = loss.total if loss.mean is None else loss.total + loss.mean
            else:
                term = check = loss / n_micro
            # backward runs even on a non-finite loss: every process must take part in the same
            # gradient collectives; the step is then skipped on all of them alike (below)
            if self.sharded:
                model.set_requires_gradient_sync(last)
                term.backward()
            else:
                with acc.no_sync(model) if not last else contextlib.nullcontext():
                    acc.backward(term)
            # read after backward is queued: reading it before would make the CPU wait for the
            # forward before issuing the backward
            finite = finite and bool(torch.isfinite(check))
            if self.accelerator.device.type == "cpu":   # threads follow the CPU share we get
                cpu_threads().tick()
            for key, v in metrics.items():
                if isinstance(v, tuple):
                    pair = pairs.setdefault(key, [0.0, 0.0])
                    pair[0] += float(v[0])
                    pair[1] += float(v[1])
                else:
                    means[key] = means.get(key, 0.0) + float(v) / n_micro
            tokens += int(metrics.get("tokens", 0))
        if pairs or (scale is not None and acc.num_processes > 1):
            # every process reduces the same keys, whatever its own micro-batches reported
            keys = sorted(set().union(*all_gather(sorted(pairs))))
            summed = all_sum([x for k in keys for x in pairs.get(k, (0.0, 0.0))])
            for i, key in enumerate(keys):
                means[key] = summed[2 * i] / summed[2 * i + 1] if summed[2 * i + 1] else float("nan")
        if self.sharded:
            from posttrain.model.parallel import clip_grad_norm_
            grad_norm = clip_grad_norm_(model, cfg.max_grad_norm)
        elif cfg.max_grad_norm:
            grad_norm = float(acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
        else:
            grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
            grad_norm = float(torch.norm(torch.stack(grads))) if grads else 0.0
        finite = self._everywhere(finite and math.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            loads = update_router_bias(self.model, cfg.bias_update_gamma)
        else:
            self.skipped += 1
            loads = update_router_bias(self.model, 0.0)  # drop this step's counts
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return means, grad_norm, finite, loads, tokens

    def _empty_step(self) -> tuple[dict, float, bool, dict, int]:
        """A step without a loss term anywhere: the weights stay, the schedule advances."""
        self.scheduler.step()
        update_router_bias(self.model, 0.0)
        self.step += 1
        return {"empty_step": 1.0}, 0.0, True, {}, 0

    def row_steps(self, rows) -> RowSteps:
        """The source for a dataset of rows: this process's share of each global batch."""
        cfg, acc = self.cfg, self.accelerator
        try:
            plan = BatchPlan(len(rows), cfg.batch_size, cfg.seed, acc.num_processes, acc.process_index)
        except ValueError as e:
            raise DataError(f"{e}: lower train.batch_size or give more data") from None
        total = cfg.max_steps or max(1, int(cfg.epochs * plan.per_epoch) // cfg.grad_accum)
        return RowSteps(rows, self.collate, plan, cfg.grad_accum, total)

    def fit(self, data, resume: bool = True) -> dict:
        """Train on `data` (rows, or a StepSource) to its last step, resuming from the latest
        checkpoint of this output when there is one."""
        cfg, acc = self.cfg, self.accelerator
        source = data if hasattr(data, "next_step") else self.row_steps(data)
        self.source = source
        total = source.total_steps
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
                batches = source.next_step(self)
                model.train()
                t_step = time.perf_counter()
                metrics, grad_norm, finite, loads, tokens = self.optimizer_step(batches)
                metrics["train_s"] = time.perf_counter() - t_step
                extra = source.step_metrics(self)
                tokens_since += tokens
                tokens_total += tokens
                bar.update(1)
                # a step the source reports on (a new rollout batch, an evaluation) is always logged
                if self.step % cfg.log_every == 0 or self.step == total or not finite or extra:
                    elapsed = time.perf_counter() - t_since
                    row = {**metrics, **extra, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                           "tokens_per_s": tokens_since / elapsed if elapsed > 0 else 0.0,
                           "skipped_nonfinite": self.skipped}
                    if loads:
                        row["expert_load_max_over_mean"] = max(loads.values())
                    if self.accelerator.device.type == "cuda":  # this process's high-water mark so far
                        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.accelerator.device) / 2**30
                    if not finite:
                        row["nonfinite_step"] = True
                    log.log(self.step, row)
                    bar.set_postfix({k: f"{row[k]:.4f}" for k in ("loss", "reward_mean") if k in row})
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


def _local(state: dict) -> dict:
    """A state dict with this process's shards (DTensor -> its local tensor)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.to_local() if isinstance(v, DTensor) else v) for k, v in state.items()}


def _load_local(target: dict, saved: dict) -> None:
    """Copy saved local shards into a sharded model's state (same layout)."""
    from torch.distributed.tensor import DTensor

    missing = set(target) ^ set(saved)
    if missing:
        raise ValueError(f"checkpoint and model differ in: {sorted(missing)[:5]}")
    with torch.no_grad():
        for k, v in target.items():
            (v.to_local() if isinstance(v, DTensor) else v).copy_(saved[k])


def _local_optimizer_state(state: dict) -> dict:
    return {**state, "state": {i: _local(s) for i, s in state["state"].items()}}


def _distribute_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """Saved local optimizer tensors back into DTensors laid out like their parameters."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {}
    for i, st in saved["state"].items():
        p = params[int(i)]
        out[i] = {k: (DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                         stride=p.stride())
                      if isinstance(p, DTensor) and torch.is_tensor(v) and v.dim() > 0 else v)
                  for k, v in st.items()}
    return {**saved, "state": out}


def lm_loss(mtp_weight: float) -> LossFn:
    """SFT's loss: next-token CE on labelled tokens + mtp_weight * mean MTP CE + balance loss."""

    def fn(model, batch):
        out = model.compute(batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"),
                            segment_ids=batch.get("segment_ids"), return_logits=False,
                            routing_segments=batch.get("routing_segments"))
        loss = out.loss
        seg = batch.get("segment_ids")
        # counts stay tensors: the loop reads them after backward is queued (reading them here
        # would make the CPU wait for the forward before it could issue the backward)
        metrics: dict[str, Any] = {
            "ce": out.loss.detach(),
            "loss_tokens": (batch["labels"] != -100).sum(),
            # input tokens processed (padding excluded): what throughput is measured in
            "tokens": (seg >= 0).sum() if seg is not None else batch["input_ids"].numel(),
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
