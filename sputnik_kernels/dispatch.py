"""Which implementation runs: SPUTNIK_KERNELS=auto (default: Triton on CUDA tensors, the pure-torch
reference otherwise), triton (Triton everywhere; CPU tensors need TRITON_INTERPRET=1, set before
the kernels are imported) or torch. Read at every call, so tests can switch."""

from __future__ import annotations

import os

import torch


def use_triton(x: torch.Tensor) -> bool:
    mode = os.environ.get("SPUTNIK_KERNELS", "auto")
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"SPUTNIK_KERNELS must be auto, triton or torch, not {mode!r}")
    if mode == "torch":
        return False
    if mode == "triton":
        return True
    return x.is_cuda
