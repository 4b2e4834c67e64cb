"""Absorbed MLA decode attention (DeepSeek-V2 section 2.1; FlashMLA / FlashDecoding style): a few
query positions per row against the latent cache, without expanding the cache into per-head keys.

The caller (model/attention.py `MLA._absorbed`) has already taken each head's query into latent
space (q_nope @ W_UK[h]) and joined its rotated RoPE part, q_BTHL = [q_lat | q_pe]; the cache row
holds [c_kv | k_pe] per slot (`LatentCache.buf_BSL`). Then, per batch row b, query t, head h:

    scores[s] = softmax_scale * <q[b, t, h], cache[b, s]>     (over all C + R columns)
    p = softmax(scores masked by mask[b, t, :])               (fp32)
    out[b, t, h] = sum_s p[s] * cache[b, s, :C]                (the latent output, before W_UV)

Shapes: B batch, T query positions (1 when decoding; a few for a multi-token verify step; the
prompt at prefill), H heads, S cache slots, C kv_lora_rank, R RoPE dim, L = C + R; the T*H queries
of a row are flattened to M = T * H "rows" (row m is query t = m // H, head h = m % H).

mask_BTS: bool [B, T, S] (True = attend; any strides, so generate()'s expanded views pass as they
are), or None: causal with the queries at the last T slots (query t sees slots s <= S - T + t).

Triton (`_mla_decode_split`): grid (cdiv(M, BLOCK_M), B, splits). A program takes BLOCK_M query
rows of one batch row — all the heads of a few positions, so each latent block it loads from the
cache serves every head in it (the point of MLA decode: one cache for all heads) — and streams over
its share of the slots in blocks of BLOCK_S: scores from two tl.dots (latent part, RoPE part),
the boolean mask applied as -inf, an online softmax in base 2 with fp32 statistics and fp32
accumulation of p @ c_kv. The head-block axis is the fastest-varying one, so programs of the same
batch row run together and share the cache through L2. When one batch row's programs cannot fill
the GPU (few rows, long cache), the slots are split over `splits` programs (split-K,
FlashDecoding): each writes its normalised partial output and log-sum-exp in fp32, and
`_mla_decode_combine` merges them with weights exp2(lse_i - max lse). With one split the first
kernel writes the output directly. A query with no visible slot gets zeros (the torch reference: NaN).

Reference: `mla_decode_reference` (the torch math `MLA._absorbed` always ran). Entry point:
`mla_decode(q_BTHL, cache_BSL, kv_rank, softmax_scale, mask_BTS)`, dispatched by SPUTNIK_KERNELS
(sputnik_kernels/dispatch.py). Inference only: the Triton path has no backward and asserts that
no gradient is wanted.

Test: `pytest tests/kernels/test_kernels_mla_decode.py` (Triton interpreted on CPU);
benchmark (GPU): `python benchmarks/mla_decode.py`, part of `benchmarks/kernel_suite.py`.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from sputnik_kernels.dispatch import use_triton

MIN_SLOTS_PER_SPLIT = 256  # below this a split's programs are mostly launch and combine overhead


def mla_decode_reference(q_BTHL: torch.Tensor, cache_BSL: torch.Tensor, kv_rank: int, softmax_scale: float,
                         mask_BTS: torch.Tensor | None = None) -> torch.Tensor:
    """The torch path: two batched matmuls against the cache, an fp32 softmax. [B, T, H, C]."""
    B, T, H, L = q_BTHL.shape
    S = cache_BSL.shape[1]
    scores = torch.bmm(q_BTHL.reshape(B, T * H, L), cache_BSL.transpose(1, 2)).view(B, T, H, S)
    scores = scores.float() * softmax_scale
    if mask_BTS is None and T > 1:
        mask_BTS = _causal_mask(B, T, S, q_BTHL.device)
    if mask_BTS is not None:
        scores = scores.masked_fill(~mask_BTS.unsqueeze(2), float("-inf"))
    p = scores.softmax(dim=-1).to(cache_BSL.dtype)
    o_lat = torch.bmm(p.view(B, T * H, S), cache_BSL[..., :kv_rank])  # (B, T*H, C)
    return o_lat.view(B, T, H, kv_rank)


def _causal_mask(B: int, T: int, S: int, device) -> torch.Tensor:
    """[B, T, S]: query t, at slot S - T + t, sees the slots up to its own."""
    t = torch.arange(T, device=device).unsqueeze(1)
    return (torch.arange(S, device=device).unsqueeze(0) <= S - T + t).unsqueeze(0).expand(B, T, S)


@triton.jit
def _mla_decode_split(Q, KV, MASK, O, LSE, n_rows, H, T, S, C, R, scale_log2, slots_per_split,
                      stride_qb, stride_qm, stride_kb, stride_ks, stride_mb, stride_mt, stride_ms,
                      stride_ob, stride_om, stride_os, stride_lb, stride_lm,
                      HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m, sp = tl.program_id(0), tl.program_id(2)
    b = tl.program_id(1).to(tl.int64)  # b * stride passes 2^31 at 128 rows x 32K slots x 576
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    t = rows // H  # the query position of each row
    cols_c = tl.arange(0, BLOCK_C)
    cols_r = tl.arange(0, BLOCK_R)
    c_ok, r_ok = cols_c < C, cols_r < R
    q_ptr = Q + b * stride_qb + rows[:, None] * stride_qm
    q_c = tl.load(q_ptr + cols_c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)  # (M, C)
    q_r = tl.load(q_ptr + C + cols_r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # (M, R)
    if UPCAST:  # Triton's interpreter gets tl.dot of bf16/fp16 operands wrong: the same values in fp32
        q_c, q_r = q_c.to(tl.float32), q_r.to(tl.float32)

    # finite start: a block with every slot masked then gives alpha = 1, p = 0 (no inf - inf)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    lo = sp * slots_per_split
    hi = tl.minimum(lo + slots_per_split, S)
    for start in range(lo, hi, BLOCK_S):
        slots = start + tl.arange(0, BLOCK_S)
        s_ok = slots < hi
        kv_ptr = KV + b * stride_kb + slots[:, None] * stride_ks
        kv = tl.load(kv_ptr + cols_c[None, :], mask=s_ok[:, None] & c_ok[None, :], other=0.0)  # (S, C), read once for all heads
        pe = tl.load(kv_ptr + C + cols_r[None, :], mask=s_ok[:, None] & r_ok[None, :], other=0.0)  # (S, R)
        if UPCAST:
            kv, pe = kv.to(tl.float32), pe.to(tl.float32)
        qk = tl.dot(q_c, tl.trans(kv), input_precision=PRECISION)
        qk = tl.dot(q_r, tl.trans(pe), qk, input_precision=PRECISION) * scale_log2  # (M, S), log2 units
        visible = s_ok[None, :] & row_ok[:, None]
        if HAS_MASK:
            m_ptr = MASK + b * stride_mb + t[:, None] * stride_mt + slots[None, :] * stride_ms
            visible = visible & (tl.load(m_ptr, mask=visible, other=0) != 0)
        else:
            visible = visible & (slots[None, :] <= (S - T + t)[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p = p.to(KV.dtype.element_ty)  # as the torch path: probabilities in the cache's dtype
        if UPCAST:
            p = p.to(tl.float32)
        acc = tl.dot(p, kv, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptr = O + b * stride_ob + rows[:, None] * stride_om + cols_c[None, :]
    if SPLIT:
        tl.store(o_ptr + sp * stride_os, out, mask=row_ok[:, None] & c_ok[None, :])
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(LSE + b * stride_lb + rows * stride_lm + sp, lse, mask=row_ok)
    else:
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])


@triton.jit
def _mla_decode_combine(O_PART, LSE, OUT, n_splits, C, stride_pb, stride_pm, stride_ps, stride_lb, stride_lm,
                        stride_ob, stride_om, BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr):
    m, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    sp = tl.arange(0, BLOCK_SPLITS)
    cols = tl.arange(0, BLOCK_C)
    sp_ok, c_ok = sp < n_splits, cols < C
    lse = tl.load(LSE + b * stride_lb + m * stride_lm + sp, mask=sp_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - top), 0.0)  # splits with no visible slot weigh 0
    part = tl.load(O_PART + b * stride_pb + m * stride_pm + sp[:, None] * stride_ps + cols[None, :],
                   mask=sp_ok[:, None] & c_ok[None, :], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(part * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(OUT + b * stride_ob + m * stride_om + cols, out.to(OUT.dtype.element_ty), mask=c_ok)


def _num_splits(n_programs: int, S: int, device: torch.device) -> int:
    """Split the slots only when one program per (row block, batch row) leaves SMs idle."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-2 * sms // n_programs), S // MIN_SLOTS_PER_SPLIT))


def mla_decode_triton(q_BTHL: torch.Tensor, cache_BSL: torch.Tensor, kv_rank: int, softmax_scale: float,
                      mask_BTS: torch.Tensor | None = None, *, splits: int | None = None, block_m: int = 16,
                      block_s: int = 32) -> torch.Tensor:
    """The Triton path. splits / block_m / block_s: tests and benchmarks/mla_decode.py; by default
    the slots are split only when the grid would not fill the GPU (`_num_splits`)."""
    assert not (torch.is_grad_enabled() and (q_BTHL.requires_grad or cache_BSL.requires_grad)), \
        "mla_decode's Triton path is for inference (no backward): call it under torch.no_grad()"
    B, T, H, L = q_BTHL.shape
    S, C, R = cache_BSL.shape[1], kv_rank, L - kv_rank
    M = T * H
    q = q_BTHL.reshape(B, M, L)
    if q.stride(-1) != 1:
        q = q.contiguous()
    kv = cache_BSL if cache_BSL.stride(-1) == 1 else cache_BSL.contiguous()
    out = torch.empty(B, M, C, device=q.device, dtype=q.dtype)
    grid_m = triton.cdiv(M, block_m)
    if splits is None:
        splits = _num_splits(grid_m * B, S, q.device)
    slots_per_split = triton.cdiv(triton.cdiv(max(S, 1), splits), block_s) * block_s
    splits = triton.cdiv(max(S, 1), slots_per_split)  # no empty split
    if mask_BTS is None:
        mask, mask_strides = q, (0, 0, 0)  # never read
    else:
        mask = mask_BTS.view(torch.uint8)  # same strides: generate()'s expanded views are not copied
        mask_strides = mask.stride()
    block_c = max(16, triton.next_power_of_2(C))
    block_r = max(16, triton.next_power_of_2(R))  # tl.dot needs K >= 16
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    precision = "tf32" if q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreted else "ieee"
    scale_log2 = softmax_scale * math.log2(math.e)
    if splits == 1:
        part, lse, part_strides, lse_strides = out, out, (out.stride(0), out.stride(1), 0), (0, 0)
    else:
        part = torch.empty(B, M, splits, C, device=q.device, dtype=torch.float32)
        lse = torch.empty(B, M, splits, device=q.device, dtype=torch.float32)
        part_strides, lse_strides = (part.stride(0), part.stride(1), part.stride(2)), (lse.stride(0), lse.stride(1))
    _mla_decode_split[(grid_m, B, splits)](
        q, kv, mask, part, lse, M, H, T, S, C, R, scale_log2, slots_per_split,
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), *mask_strides, *part_strides, *lse_strides,
        HAS_MASK=mask_BTS is not None, SPLIT=splits > 1, PRECISION=precision, UPCAST=interpreted and q.dtype != torch.float32,
        BLOCK_M=block_m, BLOCK_S=block_s, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=4, num_stages=2)
    if splits > 1:
        _mla_decode_combine[(M, B)](part, lse, out, splits, C, *part_strides, *lse_strides, out.stride(0), out.stride(1),
                                    BLOCK_SPLITS=triton.next_power_of_2(splits), BLOCK_C=block_c)
    return out.view(B, T, H, C)


def mla_decode(q_BTHL: torch.Tensor, cache_BSL: torch.Tensor, kv_rank: int, softmax_scale: float,
               mask_BTS: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA attention of q [B, T, H, C+R] against the latent cache [B, S, C+R]: the latent
    output [B, T, H, C] in q's dtype. Triton or the torch reference (sputnik_kernels.dispatch)."""
    B, T, _, L = q_BTHL.shape
    if cache_BSL.dim() != 3 or cache_BSL.shape[0] != B or cache_BSL.shape[2] != L or not 0 < kv_rank < L:
        raise ValueError(f"mla_decode: q {tuple(q_BTHL.shape)} and cache {tuple(cache_BSL.shape)} do not match "
                         f"(want [B, T, H, C+R] and [B, S, C+R], 0 < kv_rank={kv_rank} < C+R)")
    if q_BTHL.dtype != cache_BSL.dtype:
        raise ValueError(f"mla_decode: q is {q_BTHL.dtype} but the cache is {cache_BSL.dtype}")
    if mask_BTS is not None:
        S = cache_BSL.shape[1]
        if mask_BTS.dtype != torch.bool or mask_BTS.dim() != 3 or any(n not in (1, m) for n, m in zip(mask_BTS.shape, (B, T, S))):
            raise ValueError(f"mla_decode: mask must be bool [B, T, S] = {(B, T, S)} (or broadcast to it), "
                             f"got {mask_BTS.dtype} {tuple(mask_BTS.shape)}")
        mask_BTS = mask_BTS.expand(B, T, S)  # a view: size-1 dimensions get stride 0
    if use_triton(q_BTHL):
        return mla_decode_triton(q_BTHL, cache_BSL, kv_rank, softmax_scale, mask_BTS)
    return mla_decode_reference(q_BTHL, cache_BSL, kv_rank, softmax_scale, mask_BTS)
