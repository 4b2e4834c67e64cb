"""Batch-invariant primitives for `rollout.exact` (issue 20): the decode path (latent cache, one
token per step, a few rows) and the training path (whole sequences, many rows) give the same
numbers, bit for bit, on CPU in fp32.

Why each primitive (all measured on torch 2.13 CPU):
- `linear`: a GEMM's rows differ in the last bits between M = 1..3 rows and larger M (MKL
  changes kernels), while M >= 7 rows gave identical rows whatever M and a row's place in the
  batch; likewise one output column differs from the same column among >= 2. Inputs with fewer than
  `MIN_ROWS` rows, and weights with fewer than `MIN_ROWS` output rows, are padded with zeros.
- `seq_sum`: a sum whose order depends on nothing but the element order: a cumulative sum
  (sequential, accumulated in double) read at its last element. Leading or trailing zeros (masked
  attention slots: left padding in decoding, the causal future in training) leave it unchanged,
  which a vectorised sum of a different length does not. `weighted_sum` is the same idea for the
  attention output (a loop over slots, fp32), where a cumsum over [B, T, H, S, C] was 4.5x slower.
- `sigmoid`, `silu`: torch's vectorised sigmoid/SiLU and their scalar tail differ in the last bit,
  so a value's result depended on where it fell in the tensor; 1 / (1 + exp(-x)) with exp (whose
  tail agrees with its vector path) does not.
Softmax/log-softmax over a full row, RMSNorm's row mean and elementwise arithmetic are already
row-invariant. Cost at the tiny preset on CPU: decoding ~0.45x and the learner's forward+backward
~0.18x the tokens/s of the default path (attention dominates).
The GEMM properties are measured, not promised by MKL: another BLAS or CPU may need another
MIN_ROWS; the test below checks the end result (decode vs training log-probs) exactly.

Test: `pytest tests/model/test_model_exact.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_ROWS = 16


def linear(x: torch.Tensor, w_OK: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w.T -> [..., O], each row's bits independent of how many rows there are."""
    shape, o = x.shape, w_OK.shape[0]
    x_NK = x.reshape(-1, shape[-1])
    n = x_NK.shape[0]
    if n < MIN_ROWS:
        x_NK = torch.cat([x_NK, x_NK.new_zeros(MIN_ROWS - n, shape[-1])])
    if o < MIN_ROWS:
        w_OK = torch.cat([w_OK, w_OK.new_zeros(MIN_ROWS - o, w_OK.shape[1])])
    return F.linear(x_NK, w_OK)[:n, :o].reshape(*shape[:-1], o)


def seq_sum(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """Sum over `dim` in element order (cumsum's sequential double accumulation)."""
    out = x.cumsum(dim).narrow(dim, x.shape[dim] - 1, 1)
    return out if keepdim else out.squeeze(dim)


def weighted_sum(p_BTHS: torch.Tensor, v_BSC: torch.Tensor) -> torch.Tensor:
    """sum_s p[b, t, h, s] * v[b, s] -> [B, T, H, C], added slot by slot in slot order."""
    out = p_BTHS[..., 0, None] * v_BSC[:, None, None, 0]
    for s in range(1, v_BSC.shape[1]):
        out = out + p_BTHS[..., s, None] * v_BSC[:, None, None, s]
    return out


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * sigmoid(x)
