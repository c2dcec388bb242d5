"""Training-loop settings shared by SFT, reward-model training and GRPO (validated by
posttrain/config.py: every number in range, every choice known)."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.config import setting
from posttrain.model.kernels.selection import KernelSelection

REPORTERS = ("jsonl", "tensorboard", "wandb")


@dataclass
class TrainConfig:
    # where checkpoints and metrics go: the stage sets it from its `output_dir`
    out_dir: str = field(default="runs/train", metadata={"internal": "set by the stage's output_dir"})
    seed: int = 0
    epochs: float = setting(1.0, gt=0)
    max_steps: int | None = setting(None, ge=1)   # optimizer steps; overrides epochs when set
    batch_size: int = setting(8, ge=1)             # rows per micro-batch (per process)
    grad_accum: int = setting(1, ge=1)
    lr: float = setting(5e-6, gt=0)
    min_lr: float = setting(1e-6, ge=0)            # cosine floor
    warmup_steps: int = setting(0, ge=0)
    weight_decay: float = setting(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = setting(1e-8, gt=0)
    bf16_moments: bool = False                     # AdamW moments in bf16, as the report does
    max_grad_norm: float | None = setting(1.0, gt=0)
    mixed_precision: str = setting("no", choices=("no", "bf16", "fp16"))
    fp8: bool = False                              # projections + routed experts: all GEMMs in blockwise FP8
    # Parallel layout (see posttrain/model/parallel.py). Default: DDP through accelerate, every
    # process holds the whole model. expert_parallel > 1 (or fsdp) switches to FSDP2 sharding of
    # every weight, with routed experts split over groups of `expert_parallel` ranks.
    expert_parallel: int = setting(1, ge=1)
    fsdp: bool = False
    activation_checkpointing: bool = False         # recompute each block in backward (any layout)
    mtp_weight: float = setting(0.3, ge=0)         # lambda for the MTP losses
    bias_update_gamma: float = setting(0.0, ge=0)  # aux-loss-free balancing speed; 0 = frozen bias
    save_every: int = setting(0, ge=0)             # optimizer steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = setting(2, ge=1)
    log_every: int = setting(1, ge=1)
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])  # + "wandb"
    progress: bool = True
    kernels: KernelSelection = field(default_factory=KernelSelection)  # which implementation runs each op

    def __post_init__(self):
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas={list(self.betas)}: each must be in [0, 1)")
        unknown = [r for r in self.report_to if r not in REPORTERS]
        if unknown:
            raise ValueError(f"report_to={self.report_to}: each one of {', '.join(REPORTERS)}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} is above lr={self.lr}: the cosine floor must not exceed the peak")

    @property
    def sharded(self) -> bool:
        """Whether the loop shards the model (FSDP2, with or without expert parallelism)."""
        return self.fsdp or self.expert_parallel > 1

    # settings that change how a run looks, not what it computes: a rerun may differ in them
    RESUME_IGNORES = ("train.progress", "train.report_to", "train.log_every", "train.keep_checkpoints")
