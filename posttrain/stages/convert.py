"""`posttrain model convert SRC DST --to fp8|bf16`: the model core's streamed conversion
(model/convert.py), written into DST file by file (posttrain/outputs.py decides whether DST
may be written)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.config import setting
from posttrain.model.convert import convert_checkpoint
from posttrain.outputs import CONFIG, RECORD, claim_output, install_files
from posttrain.stages.common import local_inputs, require, say

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


@dataclass
class ConvertConfig:
    src: str | None = None
    dst: str | None = None
    to: str | None = setting(None, choices=("bf16", "fp8"))
    dtype: str = setting("bf16", choices=("bf16", "fp32", "fp16"))   # of the tensors that are not FP8


def run_convert(cfg: ConvertConfig, overwrite: bool = False, restart: bool = False) -> dict:
    require(cfg, "src", "dst", "to")
    src, dst = Path(cfg.src), Path(cfg.dst)
    claim = claim_output("model convert", dst, cfg, local_inputs(src), overwrite=overwrite, restart=restart)
    if claim.notes and any(p.name.endswith(WEIGHT_SUFFIXES) for p in dst.iterdir()):
        # another checkpoint's shards beside ours would be read as part of it
        raise FileExistsError(f"{dst} holds other safetensors files; convert into an empty directory")
    tmp = dst.parent / f".{dst.name}.convert-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # this stage's own temporary name
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[cfg.dtype]
    try:
        counts = convert_checkpoint(src, tmp, cfg.to, dtype=dtype, progress=lambda f: say(f"  wrote {f}"))
        # this stage's earlier weights go (the directory is its own); other files stay
        install_files(tmp, dst, stale=lambda p: p.name.endswith(WEIGHT_SUFFIXES) and p.name not in (RECORD, CONFIG))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return counts
