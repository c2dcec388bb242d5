"""`posttrain sft --config configs/sft/X.yaml key=value ...`: supervised fine-tuning.

model (an HF checkpoint, or a config.json to start from scratch) + data (a weighted mixture,
tokenized with the chat template, loss on assistant tokens, packed) -> the shared Trainer ->
`<output_dir>/final` (HF checkpoint + tokenizer). With LoRA: `<output_dir>/adapter` in
peft's format, and `final` is the base with the adapter merged in.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from data_recipes.sft_data import SFTDataConfig, SourceSpec, collate, prepare
from posttrain.config import build, setting
from posttrain.errors import all_rejected
from posttrain.io_utils import atomic_write_json
from posttrain.outputs import claim_output
from posttrain.stages.common import local_inputs
from posttrain.model import ModelArgs, Transformer, load_checkpoint, save_checkpoint
from posttrain.model.args import ConfigError
from posttrain.train.config import TrainConfig
from posttrain.train.loop import Trainer, lm_loss, process_state

LORA_MODULES = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                "gate_proj", "up_proj", "down_proj"]  # attention, dense and shared-expert FFNs
LORA_EXPERT_PARAMS = ["experts.gate_up_proj", "experts.down_proj"]  # stacked routed experts


@dataclass
class ModelSection:
    path: str | None = None         # HF checkpoint directory to fine-tune
    config: str | None = None       # or a config.json to start from random weights
    tokenizer: str | None = None    # default: the checkpoint directory; "embedded" = the local one
    dtype: str = setting("float32", choices=("float32", "bfloat16", "float16"))  # master weights


@dataclass
class LoraSection:
    enabled: bool = False
    r: int = setting(16, ge=1)
    alpha: int = setting(32, ge=1)
    dropout: float = setting(0.0, ge=0, lt=1)
    target_modules: list[str] = field(default_factory=lambda: list(LORA_MODULES))
    target_experts: bool = True     # LoRA on the routed experts' stacked weights too


@dataclass
class DataSection:
    sources: list[SourceSpec] = field(default_factory=list)
    max_length: int = setting(4096, ge=2)
    overlong: str = setting("drop", choices=("drop", "truncate"))
    pack: bool = True
    num_proc: int = setting(2, ge=1)
    cache_dir: str = ".cache/posttrain/sft"


@dataclass
class SFTConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    output_dir: str = "runs/sft"


# how a run is watched and where its caches live, not what it computes: a rerun may change them
SFT_IGNORES = TrainConfig.RESUME_IGNORES + ("data.num_proc", "data.cache_dir")


def sft_config(data: dict) -> SFTConfig:
    return check_sft(build(SFTConfig, data))


def check_sft(cfg: SFTConfig) -> SFTConfig:
    """What a field alone cannot say; the loop writes under output_dir."""
    cfg.train.out_dir = cfg.output_dir
    if not cfg.data.sources:
        raise ConfigError("data.sources is empty: list at least one {path, weight}")
    if not any(s.weight > 0 for s in cfg.data.sources):
        raise ConfigError("data.sources: every weight is 0, so there is nothing to train on")
    if not (cfg.model.path or cfg.model.config):
        raise ConfigError("model.path (a checkpoint) or model.config (a config.json) is required")
    return cfg


def claim_training_output(stage: str, cfg, inputs, overwrite: bool, restart: bool, ignore) -> str:
    """The output directory of a training stage: refused unless new, this stage's with the same
    settings (the run resumes), or restarted (its own checkpoints are removed first).

    Under a multi-process launch only the main process claims (the others would see its files
    appear mid-check and refuse them). The others wait for its outcome before they touch the
    directory or read its checkpoints; when it refuses, they exit quietly with the same code
    and the main process's one-line error is the report."""
    from posttrain.train.collective import broadcast, world_size
    from posttrain.train.loop import process_state

    state = process_state()   # under a launcher this starts the process group
    if world_size() > 1 and not state.is_main_process:
        outcome = broadcast(None)
        if outcome[0] == "refused":
            raise SystemExit(2)
        return outcome[1]
    try:
        claimed = _claim(stage, cfg, inputs, overwrite, restart, ignore)
    except BaseException:
        if world_size() > 1:
            broadcast(("refused", None))
        raise
    if world_size() > 1:
        broadcast(("claimed", claimed))
    return claimed


def _claim(stage: str, cfg, inputs, overwrite: bool, restart: bool, ignore) -> str:
    claim = claim_output(stage, cfg.output_dir, cfg, local_inputs(*inputs), overwrite=overwrite, restart=restart,
                         ignore=ignore)
    if claim.state == "restart":
        from posttrain.outputs import remove_owned
        from posttrain.train.loop import CHECKPOINT_MARKER

        for path in (Path(cfg.output_dir) / "checkpoints").glob("step-*"):
            remove_owned(path, CHECKPOINT_MARKER)
        (Path(cfg.output_dir) / "checkpoints" / "latest").unlink(missing_ok=True)
    return claim.state


def load_tokenizer(spec: str | None, model_path: str | None, vocab_size: int):
    if spec == "embedded" or (spec is None and model_path is None):
        from posttrain.embedded import build_tokenizer

        return build_tokenizer(vocab_size)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec or model_path)


def load_model(section: ModelSection, scalar_head: bool = False) -> tuple[Transformer, ModelArgs]:
    """From a checkpoint, or freshly initialised from a config; `scalar_head` adds the reward
    head (new, or the checkpoint's)."""
    dtype = getattr(torch, section.dtype)
    if section.path:
        return load_checkpoint(section.path, dtype=dtype, scalar_head=scalar_head or None)
    args = ModelArgs.from_json(section.config)
    # Built directly in the target dtype: a 16B model in float32 first would take 64 GB of host
    # memory in every process of a multi-GPU launch before the cast halved it. Only parameters
    # take the dtype: the router bias, the load counts and RoPE's inverse frequencies declare
    # float32 and keep it (a cast of the whole module had rounded them to bf16, as the
    # checkpoint loader never did).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Transformer(args, scalar_head=scalar_head)
    finally:
        torch.set_default_dtype(previous)
    return model, args


def apply_lora(model: Transformer, lora: LoraSection, modules_to_save: list[str] | None = None):
    """peft LoRA on the configured modules; `modules_to_save` are trained fully and saved with
    the adapter (a reward model's new head)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=lora.target_modules,
                     target_parameters=LORA_EXPERT_PARAMS if lora.target_experts else None,
                     modules_to_save=modules_to_save)
    return get_peft_model(model, cfg)


def run_sft(cfg: SFTConfig, overwrite: bool = False, restart: bool = False) -> dict:
    check_sft(cfg)
    claim_training_output("sft", cfg, [s.path for s in cfg.data.sources] + [cfg.model.path, cfg.model.config],
                          overwrite, restart, SFT_IGNORES)
    torch.manual_seed(cfg.train.seed)  # a model started from a config is initialised reproducibly
    model, args = load_model(cfg.model)
    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.path, args.vocab_size)
    if len(tokenizer) > args.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model only {args.vocab_size}")
    data_cfg = SFTDataConfig(sources=cfg.data.sources, max_length=cfg.data.max_length, overlong=cfg.data.overlong,
                             pack=cfg.data.pack, seed=cfg.train.seed, num_proc=cfg.data.num_proc,
                             cache_dir=cfg.data.cache_dir)
    # under a multi-process launch the main process prepares (and caches) the data; the others
    # then load it from the cache instead of racing to write it
    with process_state().main_process_first():
        prepared = prepare(data_cfg, tokenizer)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if process_state().is_main_process:
        atomic_write_json(out / "data_stats.json", prepared.stats)
        shutil.copyfile(prepared.path / "rejects.jsonl", out / "data_rejects.jsonl")
    if prepared.stats["samples_kept"] == 0:
        raise all_rejected("samples", max(prepared.stats["samples"], prepared.stats["rejected"]),
                           out / "data_rejects.jsonl")
    trained = apply_lora(model, cfg.lora) if cfg.lora.enabled else model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = Trainer(trained, cfg.train, lm_loss(cfg.train.mtp_weight),
                      lambda rows: collate(rows, pad, pad_to=cfg.data.max_length if cfg.data.pack else None),
                      run_config=asdict(cfg))
    result = trainer.fit(prepared.dataset)
    final = trainer.model
    if cfg.lora.enabled:
        if trainer.is_main:
            final.save_pretrained(str(out / "adapter"))
            save_checkpoint(final.merge_and_unload(), args, out / "final", tokenizer=tokenizer)
    else:  # every process takes part: a sharded model is gathered as it is written
        trainer.export(out / "final", args, tokenizer=tokenizer)
    if trainer.is_main:
        write_training_provenance(out / "final", prepared.stats)
    return {**result, "data": prepared.stats, "final": str(out / "final")}


PROVENANCE = "posttrain-training.json"


def write_training_provenance(final: Path, stats: dict) -> None:
    """What the checkpoint was trained on that later stages need: the system prompt its data
    used (GRPO samples with the same one by default)."""
    prompts = stats.get("system_prompts") or []
    top = prompts[0] if prompts else None
    atomic_write_json(final / PROVENANCE, {
        # the prompt most samples were trained with; None when most had none
        "system_prompt": top["system_prompt"] if top else None,
        "system_prompts": prompts, "samples": stats.get("samples_kept")})


def trained_system_prompt(checkpoint: str | Path) -> tuple[bool, str | None]:
    """(known, system prompt) a checkpoint was trained with, from its provenance file."""
    path = Path(checkpoint) / PROVENANCE
    try:
        return True, json.loads(path.read_text()).get("system_prompt")
    except (OSError, ValueError):
        return False, None
