"""Rotary position embedding with YaRN context extension, as in DeepSeek-V3.

RoPE rotates interleaved pairs (x0, x1), (x2, x3), ... of the decoupled RoPE dimensions, written
as complex multiplication. YaRN (rope_factor > 1) slows the low-frequency dimensions by the factor
with a linear ramp between the beta_fast / beta_slow correction dimensions, and scales the softmax
by mscale² (`yarn_softmax_scale`).

Test: `pytest tests/model/test_model_hf.py` (parity with transformers' rotary embedding).
"""

from __future__ import annotations

import math

import torch

from model.args import ModelArgs


def _correction_dim(n_rot: float, dim: int, base: float, max_len: int) -> float:
    return dim * math.log(max_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))


def precompute_freqs_cis(args: ModelArgs) -> torch.Tensor:
    """Complex rotations [max_seq_len, qk_rope_head_dim // 2] (complex64)."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if args.rope_factor > 1:
        low = max(math.floor(_correction_dim(args.beta_fast, dim, base, args.original_seq_len)), 0)
        high = min(math.ceil(_correction_dim(args.beta_slow, dim, base, args.original_seq_len)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp  # 1 for high-frequency dims (kept), 0 for low-frequency dims (interpolated)
        freqs = freqs / args.rope_factor * (1 - smooth) + freqs * smooth
    t = torch.arange(args.max_seq_len, dtype=torch.float32)
    return torch.polar(torch.ones(args.max_seq_len, dim // 2), torch.outer(t, freqs))


def yarn_softmax_scale(args: ModelArgs) -> float:
    """Attention softmax scale: (nope + rope)^-0.5, times mscale² under YaRN."""
    scale = args.qk_head_dim**-0.5
    if args.rope_factor > 1:
        mscale = 0.1 * args.mscale * math.log(args.rope_factor) + 1.0
        scale *= mscale * mscale
    return scale


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, R] (or [B, T, R]) rotated by freqs_cis [B or 1, T, R/2] on interleaved pairs."""
    dtype = x.dtype
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    f = freqs_cis if x.dim() == 3 else freqs_cis.unsqueeze(2)
    return torch.view_as_real(xc * f).flatten(-2).to(dtype)
