"""HF safetensors checkpoints in and out, in the layout transformers and vLLM read.

On disk (HF DeepSeek-V3 names):
    model.embed_tokens.weight, model.norm.weight, lm_head.weight
    model.layers.{i}.self_attn.*, .mlp.gate.weight, .mlp.gate.e_score_correction_bias,
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight       one tensor per expert
    model.layers.{L + d}.*                                            MTP depth d (L = num_hidden_layers)
    *.weight_scale_inv                                                FP8 e4m3 block scales
In memory the routed experts are stacked as transformers 5 keeps them (`mlp.experts.gate_up_proj`
[E, 2I, D]: each expert's gate rows then its up rows; `mlp.experts.down_proj` [E, D, I]) and
names drop the `model.` prefix; MTP modules are `mtp.{d}.*`. Files with transformers 5's fused
names are read too.

Saving writes into a temporary directory next to the target and renames it into place, so a
crash never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .args import ConfigError, ModelArgs
from .fp8 import QUANTIZATION_CONFIG, weight_dequant, weight_quant
from .rope import RotaryEmbedding
from .mtp import MTPModule
from .transformer import Transformer, init_parameter_

_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
_STACKED = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
# A per-expert tensor's place in the stacked parameters: (parameter, which half of the rows).
_STACKED_PART = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None)}


def _parts_of(stacked_name: str) -> tuple[str, ...]:
    """The per-expert projections a stacked parameter holds ("...experts.gate_up_proj" -> gate, up)."""
    return tuple(proj for proj, (param, _) in _STACKED_PART.items() if stacked_name.endswith("." + param))
_LAYER = re.compile(r"^model\.layers\.(?P<i>\d+)\.(?P<rest>.+)$")
# MTP layers repeat the shared embedding and head; they are written, and skipped on load.
_MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
# Weights the release keeps in high precision: embedding, head, router, norms, MTP projection.
_FP8_EXCLUDE = re.compile(r"(embed_tokens|lm_head|shared_head\.head|\.gate\.weight|norm\.weight|eh_proj|score)")


class CheckpointError(RuntimeError):
    """A checkpoint directory that does not match its config or this model."""


# ---------------------------------------------------------------------- names
def hf_to_internal(name: str, num_layers: int) -> str | None:
    """HF tensor name -> internal parameter name (experts keep their `.{e}.` index for now).

    Returns None for tensors that are deliberately skipped (MTP copies of shared tensors).
    """
    if name.startswith("model.layers."):
        m = _LAYER.match(name)
        i, rest = int(m["i"]), m["rest"]
        if i < num_layers:
            return f"layers.{i}.{rest}"
        if rest in _MTP_COPIES:
            return None
        return f"mtp.{i - num_layers}.{rest}"
    if name.startswith("model."):
        return name[len("model."):]
    return name


def internal_to_hf(name: str, num_layers: int) -> str:
    if name.startswith("layers."):
        return "model." + name
    if name.startswith("mtp."):
        _, d, rest = name.split(".", 2)
        return f"model.layers.{num_layers + int(d)}.{rest}"
    if name in ("lm_head.weight", "score.weight"):
        return name
    return "model." + name


# ---------------------------------------------------------------------- load
def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file, from the sharded index or by opening the single file(s)."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not a mapping")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        missing = sorted({f for f in weight_map.values() if not (path / f).exists()})
        if missing:
            raise CheckpointError(f"{path}: index names shard(s) that are missing: {missing}")
        return {k: path / f for k, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files and no model.safetensors.index.json")
    out = {}
    for f in files:
        with _opened(f) as sf:
            out.update({k: f for k in sf.keys()})
    return out


@contextlib.contextmanager
def _opened(f: Path):
    """safe_open, with a corrupt or truncated file reported as a CheckpointError naming it."""
    try:
        with safe_open(str(f), "pt") as sf:
            yield sf
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0][:200]}); "
                              "the file is corrupt or truncated") from None


def has_tensor(path: str | os.PathLike, name: str) -> bool:
    """Whether the checkpoint at `path` stores tensor `name` (HF name), e.g. score.weight."""
    return name in _weight_files(Path(path))


def _read_tensors(path: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, tensor in `dtype`), dequantising FP8 weights with their block scales."""
    where = _weight_files(path)
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, f in where.items():
        if not name.endswith(".weight_scale_inv"):
            by_file[f].append(name)
    for f, names in by_file.items():
        with _opened(f) as sf:
            for name in names:
                t = sf.get_tensor(name)
                if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    scale_name = name[: -len(".weight")] + ".weight_scale_inv" if name.endswith(".weight") else None
                    if scale_name not in where:
                        raise CheckpointError(f"{name} is FP8 but {scale_name} is missing")
                    with _opened(where[scale_name]) as sf_scale:
                        scale = sf_scale.get_tensor(scale_name)
                    try:
                        t = weight_dequant(t, scale, dtype)
                    except ValueError as e:
                        raise CheckpointError(f"{name}: {e}") from None
                elif name.endswith("e_score_correction_bias"):
                    t = t.float()  # selection bias stays float32 whatever the model dtype
                else:
                    t = t.to(dtype)
                yield name, t


def load_checkpoint(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    scalar_head: bool | None = None,
) -> tuple[Transformer, ModelArgs]:
    """Load an HF DeepSeek-V3 directory (bf16/fp32, or FP8 with weight_scale_inv) into the core.

    scalar_head: build the scalar (reward/value) head; None = only if the checkpoint has one.
    MTP weights are loaded when present; if the config asks for MTP modules the checkpoint
    lacks, they stay freshly initialised and a warning says so. Any other missing, unexpected
    or mis-shaped tensor raises CheckpointError.
    """
    path = Path(path)
    args = ModelArgs.from_json(path / "config.json")
    files = _weight_files(path)
    has_score = "score.weight" in files
    if scalar_head is None:
        scalar_head = has_score
    with torch.device("meta"):
        model = Transformer(args, scalar_head=scalar_head)
    expected = dict(model.state_dict(keep_vars=True))
    state: dict[str, torch.Tensor] = {}
    stacked: dict[str, torch.Tensor] = {}
    filled: dict[str, set[int]] = defaultdict(set)
    unexpected = []
    for hf_name, t in _read_tensors(path, dtype):
        name = hf_to_internal(hf_name, args.num_hidden_layers)
        if name is None:
            continue
        if name == "score.weight" and not scalar_head:
            continue
        m = _EXPERT.match(name)
        fused = _FUSED.match(name)
        if m:
            param, half = _STACKED_PART[m["proj"]]
            key = f"{m['prefix']}.{param}"
            if key not in expected:
                unexpected.append(hf_name)
                continue
            buf = stacked.setdefault(key, torch.empty(expected[key].shape, dtype=dtype))
            e = int(m["e"])
            rows = buf.shape[1] // 2 if half is not None else buf.shape[1]  # gate_up: [gate; up] per expert
            if e >= buf.shape[0] or tuple(t.shape) != (rows, *buf.shape[2:]):
                raise CheckpointError(f"{hf_name}: shape {tuple(t.shape)} / expert {e} does not fit {tuple(buf.shape)}")
            start = (half or 0) * rows
            buf[e, start:start + rows] = t
            filled[key].add((e, m["proj"]))
            continue
        if fused:
            key = f"{fused['prefix']}.{fused['proj']}"
            if key not in expected:
                unexpected.append(hf_name)
                continue
            _check_shape(hf_name, t, expected[key])
            stacked[key] = t.contiguous()
            filled[key] = {(e, p) for e in range(t.shape[0]) for p in _parts_of(key)}
            continue
        if name not in expected:
            unexpected.append(hf_name)
            continue
        _check_shape(hf_name, t, expected[name])
        state[name] = t
    if unexpected:
        raise CheckpointError(f"{path}: tensors this config has no place for: {unexpected[:10]}"
                              + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
    for key, buf in stacked.items():
        missing_experts = sorted({e for e in range(buf.shape[0]) for p in _parts_of(key) if (e, p) not in filled[key]})
        if missing_experts:
            raise CheckpointError(f"{key}: experts {missing_experts[:8]} missing from the checkpoint")
        state[key] = buf
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state) - ({"score.weight"} if scalar_head and not has_score else set()))
    missing_mtp = [k for k in missing if k.startswith("mtp.")]
    missing_main = [k for k in missing if not k.startswith("mtp.")]
    if missing_main:
        raise CheckpointError(f"{path}: missing tensors {missing_main[:10]}"
                              + (f" (+{len(missing_main) - 10} more)" if len(missing_main) > 10 else ""))
    model = model.to_empty(device=device)
    if missing_mtp:
        fresh_depths = sorted({int(k.split(".")[1]) for k in missing_mtp})
        present = [k for k in state if k.startswith(tuple(f"mtp.{d}." for d in fresh_depths))]
        if present:
            raise CheckpointError(f"{path}: MTP depth(s) {fresh_depths} are only partly present: missing {missing_mtp[:5]}")
        warnings.warn(f"{path}: no weights for MTP depth(s) {fresh_depths}; they start freshly initialised",
                      stacklevel=2)
        for d in fresh_depths:
            module = MTPModule(args, args.num_hidden_layers + d)
            _init_fresh(module, args)
            state.update({f"mtp.{d}.{k}": v.to(dtype) for k, v in module.state_dict().items()})
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if scalar_head and "score.weight" not in state:
        torch.nn.init.normal_(model.score.weight, std=args.initializer_range)
        model.score.to(dtype)
    _reset_buffers(model, args, device)
    return model, args


def _check_shape(hf_name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if tuple(t.shape) != tuple(ref.shape):
        raise CheckpointError(f"{hf_name}: checkpoint shape {tuple(t.shape)}, model expects {tuple(ref.shape)}")


@torch.no_grad()
def _init_fresh(module: torch.nn.Module, args: ModelArgs) -> None:
    """The same init as Transformer.init_weights, for a module built on its own."""
    for name, p in module.named_parameters():
        init_parameter_(name, p, args.initializer_range)


def _reset_buffers(model: Transformer, args: ModelArgs, device) -> None:
    """Non-persistent buffers are not in checkpoints: rebuild them on the target device."""
    model.rotary = RotaryEmbedding(args).to(device)
    for moe in model.moe_layers():
        moe.tokens_per_expert = torch.zeros(args.n_routed_experts, dtype=torch.float32, device=device)
        if moe.gate.e_score_correction_bias.is_meta:
            moe.gate.e_score_correction_bias = torch.zeros(args.n_routed_experts, dtype=torch.float32, device=device)


# ---------------------------------------------------------------------- save
def hf_state_dict(model: Transformer, args: ModelArgs,
                  state_dict: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) in checkpoint layout: experts unstacked, MTP copies added.

    state_dict: whole tensors to write instead of the model's own (a sharded model's
    `parallel.full_state_dict`)."""
    L = args.num_hidden_layers
    sd = model.state_dict() if state_dict is None else state_dict
    for name, t in sd.items():
        if args.tie_word_embeddings and name == "lm_head.weight":
            continue
        m = _STACKED.match(name)
        if m:
            for e in range(t.shape[0]):
                if m["proj"] == "gate_up_proj":
                    gate, up = t[e].chunk(2, dim=0)
                    yield internal_to_hf(f"{m['prefix']}.{e}.gate_proj.weight", L), gate
                    yield internal_to_hf(f"{m['prefix']}.{e}.up_proj.weight", L), up
                else:
                    yield internal_to_hf(f"{m['prefix']}.{e}.down_proj.weight", L), t[e]
            continue
        yield internal_to_hf(name, L), t
    head = sd["embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight"]
    for d in range(args.num_nextn_predict_layers):
        yield f"model.layers.{L + d}.embed_tokens.weight", sd["embed_tokens.weight"].detach()
        yield f"model.layers.{L + d}.shared_head.head.weight", head.detach()


def _fp8_eligible(hf_name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and hf_name.startswith("model.layers.") and hf_name.endswith("_proj.weight") \
        and not _FP8_EXCLUDE.search(hf_name)


def save_checkpoint(
    model: Transformer,
    args: ModelArgs,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    fp8: bool = False,
    max_shard_bytes: int = 5 * 1024**3,
    tokenizer=None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write an HF directory: config.json, safetensors shard(s), index, optional tokenizer.

    dtype: storage dtype of non-FP8 tensors (default: the model's); fp8: store the release's
    FP8 set as e4m3 + weight_scale_inv and add `quantization_config`. Atomic: built under a
    temporary name and renamed into place. state_dict: whole tensors to write in place of the
    model's own (for a sharded model: `parallel.GatheredStateDict(model)`, walked in the same
    order by every rank, as `hf_state_dict` walks it once).
    """
    path = Path(path)
    if dtype is None:
        dtype = next(model.parameters()).dtype
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for hf_name, t in hf_state_dict(model, args, state_dict):
            t = t.detach()
            out: dict[str, torch.Tensor] = {}
            if fp8 and _fp8_eligible(hf_name, t):
                q, s = weight_quant(t)
                out[hf_name], out[hf_name[: -len(".weight")] + ".weight_scale_inv"] = q, s
            elif hf_name.endswith("e_score_correction_bias"):
                out[hf_name] = t.to("cpu", torch.float32, copy=True)
            else:
                out[hf_name] = t.to("cpu", dtype, copy=True)
            nbytes = sum(v.numel() * v.element_size() for v in out.values())
            if size and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1].update({k: v.contiguous() for k, v in out.items()})
            size += nbytes
        names = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map, total = {}, 0
        for fname, shard in zip(names, shards):
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            for k, v in shard.items():
                weight_map[k] = fname
                total += v.numel() * v.element_size()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = args.to_hf_config(torch_dtype=str(dtype).removeprefix("torch."))
        if fp8:
            config["quantization_config"] = dict(QUANTIZATION_CONFIG)
        if model.score is not None:
            config["architectures"] = ["DeepseekV3ForSequenceClassification"]
            config["num_labels"] = 1
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _replace_dir(src: Path, dst: Path) -> None:
    """Move `src` to `dst`; an existing `dst` is moved aside first and removed only afterwards."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["load_checkpoint", "save_checkpoint", "CheckpointError", "hf_state_dict", "ConfigError"]
