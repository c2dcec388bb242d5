"""Training-loop settings shared by SFT, reward-model training and GRPO."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    seed: int = 0
    epochs: float = 1.0
    max_steps: int | None = None           # optimizer steps; overrides epochs when set
    batch_size: int = 8                    # rows per micro-batch (per process)
    grad_accum: int = 1
    lr: float = 5e-6
    min_lr: float = 1e-6                   # cosine floor
    warmup_steps: int = 0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    bf16_moments: bool = False             # AdamW moments in bf16, as the report does
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"            # "no" | "bf16" | "fp16" (accelerate)
    fp8: bool = False                      # projections + routed experts: all GEMMs in blockwise FP8
    # Parallel layout (see posttrain/model/parallel.py). Default: DDP through accelerate, every
    # process holds the whole model. expert_parallel > 1 (or fsdp) switches to FSDP2 sharding of
    # every weight, with routed experts split over groups of `expert_parallel` ranks.
    expert_parallel: int = 1
    fsdp: bool = False
    activation_checkpointing: bool = False  # recompute each block in backward (any layout)
    mtp_weight: float = 0.3                # lambda for the MTP losses
    bias_update_gamma: float = 0.0         # aux-loss-free balancing speed; 0 = frozen bias
    save_every: int = 0                    # optimizer steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])  # + "wandb"
    progress: bool = True

    @property
    def sharded(self) -> bool:
        """Whether the loop shards the model (FSDP2, with or without expert parallelism)."""
        return self.fsdp or self.expert_parallel > 1
