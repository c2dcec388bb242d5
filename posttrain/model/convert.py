"""Checkpoint dtype conversion, streamed shard by shard (never the whole model in memory).

fp8 -> bf16 dequantises every e4m3 weight with its `weight_scale_inv` and drops the scales
and `quantization_config` (what the release's fp8_cast_bf16 does); bf16 -> fp8 quantises the
weights the release keeps in FP8 (attention and FFN projections of every block) to 128x128
blocks and adds the scales and `quantization_config`. Tensor names and the shard layout are
kept; the output directory appears atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import CheckpointError, _fp8_eligible, _opened, _replace_dir, _weight_files
from .fp8 import FP8_DTYPE, QUANTIZATION_CONFIG, weight_dequant, weight_quant

_WEIGHT_FILES = {"model.safetensors.index.json", "config.json"}


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, to: str,
                       dtype: torch.dtype = torch.bfloat16, progress=None) -> dict[str, int]:
    """Convert `src` to `to` in {"bf16", "fp8"}; returns counts of converted/copied tensors."""
    if to not in ("bf16", "fp8"):
        raise ValueError(f"--to must be 'bf16' or 'fp8', got {to!r}")
    src, dst = Path(src), Path(dst)
    try:
        config = json.loads((src / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{src} is not a checkpoint directory (no config.json)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{src / 'config.json'} is not valid JSON ({e})") from None
    where = _weight_files(src)
    files = sorted(set(where.values()))
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = {"converted": 0, "kept": 0}
    weight_map: dict[str, str] = {}
    total = 0
    try:
        for f in files:
            out: dict[str, torch.Tensor] = {}
            with _opened(f) as sf:
                for name in sf.keys():
                    if name.endswith(".weight_scale_inv"):
                        continue
                    t = sf.get_tensor(name)
                    scale_name = name[: -len(".weight")] + ".weight_scale_inv"
                    if t.dtype == FP8_DTYPE and to == "bf16":
                        if scale_name not in where:
                            raise CheckpointError(f"{name} is FP8 but {scale_name} is missing")
                        with safe_open(str(where[scale_name]), "pt") as s2:
                            out[name] = weight_dequant(t, s2.get_tensor(scale_name), dtype)
                        counts["converted"] += 1
                    elif t.dtype == FP8_DTYPE:  # already FP8: keep with its scale
                        with safe_open(str(where[scale_name]), "pt") as s2:
                            out[name], out[scale_name] = t, s2.get_tensor(scale_name)
                        counts["kept"] += 1
                    elif to == "fp8" and _fp8_eligible(name, t):
                        out[name], out[scale_name] = weight_quant(t)
                        counts["converted"] += 1
                    else:
                        keep_fp32 = name.endswith("e_score_correction_bias")
                        out[name] = t.float() if keep_fp32 else t.to(dtype) if t.is_floating_point() else t
                        counts["kept"] += 1
            save_file(out, str(tmp / f.name), metadata={"format": "pt"})
            for k, v in out.items():
                weight_map[k] = f.name
                total += v.numel() * v.element_size()
            if progress:
                progress(f.name)
        if (src / "model.safetensors.index.json").exists():
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config.pop("quantization_config", None)
        if to == "fp8":
            config["quantization_config"] = dict(QUANTIZATION_CONFIG)
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for extra in src.iterdir():  # tokenizer, generation config, README, ...
            if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in _WEIGHT_FILES:
                shutil.copy2(extra, tmp / extra.name)
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts
