"""Which implementation runs each op that has several: one record, set from the training
config (`train.kernels.*`) by the loop, or for a block of code with `selected(...)`; never
from environment variables.

    fp8_gemm     auto | cublas | triton | torch   dense FP8 GEMM (auto: cuBLAS blockwise where
                                                  it qualifies, else Triton on SM89+, else torch)
    grouped_mm   auto | torch | loop              bf16 grouped GEMM (auto: torch._grouped_mm on
                                                  GPUs that run it, a per-expert loop elsewhere)
    grouped_fp8  auto | gluon | triton            grouped FP8 GEMM on the GPU (auto: the Gluon
                                                  kernel on Hopper where the operands allow)
    packed       auto | always                    projections of one input as one GEMM (auto:
                                                  on the GPU only; always: on CPU tensors too,
                                                  which changes CPU numbers by summation order)
A forced choice that cannot run raises instead of falling back.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

CHOICES = {"fp8_gemm": ("auto", "cublas", "triton", "torch"), "grouped_mm": ("auto", "torch", "loop"),
           "grouped_fp8": ("auto", "gluon", "triton"), "packed": ("auto", "always")}


@dataclass
class KernelSelection:
    fp8_gemm: str = "auto"
    grouped_mm: str = "auto"
    grouped_fp8: str = "auto"
    packed: str = "auto"

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"kernels.{name}={getattr(self, name)!r}: one of {', '.join(allowed)}")


_active = KernelSelection()


def active() -> KernelSelection:
    return _active


def select(selection: KernelSelection) -> None:
    """Make `selection` the one every op consults from now on."""
    global _active
    _active = dataclasses.replace(selection)


@contextlib.contextmanager
def selected(**choices):
    """The current selection with some choices changed, for a block of code."""
    global _active
    previous = _active
    _active = dataclasses.replace(previous, **choices)
    try:
        yield _active
    finally:
        _active = previous
