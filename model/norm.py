"""RMSNorm with fp32 statistics (the model's only normalisation layer); runs `sputnik_kernels.rmsnorm`
(Triton on CUDA tensors, the pure-torch reference on CPU).

Test: `pytest tests/kernels/test_kernels_rmsnorm.py` (the op), tests/model/test_model_hf.py (in the model).
"""

from __future__ import annotations

import torch
from torch import nn

from sputnik_kernels import rmsnorm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm(x, self.weight, self.eps)
