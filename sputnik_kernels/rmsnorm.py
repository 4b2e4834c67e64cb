"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, statistics in fp32.

Triton: one program per row block; the forward saves 1/rms per row; the backward computes
dx = rstd * (w*dy - x_hat * mean(x_hat * w*dy)) and per-program partial sums of dw = sum dy*x_hat,
reduced in torch. Reference: `rmsnorm_reference`. Entry point: `rmsnorm(x, weight, eps)`.

Test: `pytest tests/kernels/test_kernels_rmsnorm.py`; benchmark: `python benchmarks/kernel_ops.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sputnik_kernels.dispatch import use_triton


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


@triton.jit
def _rmsnorm_fwd(X, W, Y, RSTD, n_cols, stride, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * stride + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd(DY, X, W, RSTD, DX, DW_PARTIAL, n_rows, n_cols, stride, rows_per_program, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = start + i
        if row < n_rows:
            x = tl.load(X + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            x_hat = x * rstd
            wdy = w * dy
            dx = rstd * (wdy - x_hat * (tl.sum(x_hat * wdy, axis=0) / n_cols))
            tl.store(DX + row * stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * x_hat
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        n_rows, n_cols = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        block = triton.next_power_of_2(n_cols)
        _rmsnorm_fwd[(n_rows,)](x2, weight, y, rstd, n_cols, x2.stride(0), eps, BLOCK=block)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols).contiguous()
        dx = torch.empty_like(x2)
        n_programs = min(n_rows, 4 * (torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 2))
        rows_per_program = -(-n_rows // max(1, n_programs))
        dw_partial = torch.empty(max(1, n_programs), n_cols, device=x2.device, dtype=torch.float32)
        block = triton.next_power_of_2(n_cols)
        _rmsnorm_bwd[(max(1, n_programs),)](dy2, x2, weight, rstd, dx, dw_partial, n_rows, n_cols, x2.stride(0), rows_per_program, BLOCK=block)
        return dx.view(ctx.shape), dw_partial.sum(0).to(weight.dtype), None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension: Triton or the torch reference (see sputnik_kernels.dispatch)."""
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rmsnorm: x has last dimension {x.shape[-1]} but weight has {weight.shape[0]}")
    if use_triton(x):
        return _RMSNorm.apply(x, weight, eps)
    if x.dtype == weight.dtype:
        # torch's own rms_norm: fp32 statistics for low-precision inputs, bit-identical to the
        # reference here (fp32, bf16, fp16 on CPU) in one call instead of eight
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return rmsnorm_reference(x, weight, eps)
