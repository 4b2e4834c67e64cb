"""FP8 block-scaled GEMM kernels (sputnik_kernels/fp8.py's GEMMs): the dense persistent GEMM, the
grouped GEMM of the routed experts (forward and dgrad) and its wgrad, with their tile tables.

fp8.py holds the quantisers, the torch references and the public entry points; this module only
launches kernels on already-quantised operands. See fp8.py's docstring for the design; in short,
as DeepGEMM does: every 128-wide K block's partial product is a fresh FP8 tl.dot that is
multiplied by its scales in fp32 and added to an fp32 accumulator (V3 section 3.3.2's promotion),
the grid is one program per SM walking output tiles in grouped (L2-friendly) order, and on Hopper
the operand tiles come in through TMA (tensor descriptors); elsewhere, and in the interpreter by
default, through pointer loads. A config dict (`gemm_config`, `grouped_config`, or one passed
explicitly, as benchmarks/fp8_gemm.py --sweep does) picks the tiles and the load path.

Test: `pytest tests/kernels/test_kernels_fp8.py`; compile for sm90 without a GPU and print
registers, spills, shared memory and TMA use: `python benchmarks/fp8_gemm.py --compile-only`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from sputnik_kernels.moe import expert_row_tile

# ---------------------------------------------------------------------------------------------
# tile helpers


@triton.jit
def _tile_coords(tile, n_m, n_n, GROUP_M: tl.constexpr):
    """Output tile number -> (row tile, column tile) in grouped order (Triton's matmul tutorial):
    GROUP_M row tiles walk the column tiles together, so the B tiles they share stay in L2."""
    width = GROUP_M * n_n
    first_m = (tile // width) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    return first_m + (tile % width) % size_m, (tile % width) // size_m


@triton.jit
def _scale(a_s, b_s, B_SCALE_SCALAR: tl.constexpr):
    """One K step's scales as the promotion multiplies them: row scales a_s [BLOCK_M] times the B
    scale, one scalar per step (B_SCALE_SCALAR) or one per column b_s [BLOCK_N]."""
    if B_SCALE_SCALAR:
        return (a_s * b_s)[:, None]
    return a_s[:, None] * b_s[None, :]


@triton.jit
def _promote(acc, a, b_t, scale, FP8_DOT: tl.constexpr):
    """acc + (a @ b_t) * scale: one K block's partial product, a fresh dot, promoted to the fp32
    accumulator with its scales (scale [BLOCK_M, 1] or [BLOCK_M, BLOCK_N]). FP8_DOT: an FP8
    tl.dot, else both operands upcast to fp32 (exact; the interpreter has no e4m3 dot)."""
    if FP8_DOT:
        part = tl.dot(a, b_t)
    else:
        part = tl.dot(a.to(tl.float32), b_t.to(tl.float32), input_precision="ieee")
    return acc + part * scale


# ---------------------------------------------------------------------------------------------
# dense GEMM: C [M, N] = A [M, K] @ B [N, K]^T


@triton.jit
def _fp8_gemm_persistent(A, AS, B, BS, C, M, N, K, b_scale_rows,
                         stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
                         stride_cm, stride_cn,
                         NUM_SMS: tl.constexpr, USE_TMA: tl.constexpr, FP8_DOT: tl.constexpr,
                         B_SCALE_SCALAR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C[m, n] = sum over K blocks kb of (A_q[m, kb] . B_q[n, kb]) * AS[m, kb] * BS[n // b_scale_rows, kb].

    Program p computes tiles p, p + NUM_SMS, ... (grouped order). BLOCK_K is the quantisation
    block. USE_TMA: A, B and C are tensor descriptors with blocks [BLOCK_M, BLOCK_K], [BLOCK_N,
    BLOCK_K] and [BLOCK_M, BLOCK_N] (TMA zero-fills reads and clips writes past the edges); else
    pointers. B_SCALE_SCALAR: B's scales are per BLOCK_K x BLOCK_K block and a column tile lies in
    one block, so each K step has one B scale.
    """
    n_m, n_n, n_k = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), n_m * n_n, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile, n_m, n_n, GROUP_M)
        m0, n0 = pid_m * BLOCK_M, pid_n * BLOCK_N
        # Rows (columns) past the edge read row M-1 (N-1) and are never stored: no M/N load masks.
        rm = tl.minimum(m0 + tl.arange(0, BLOCK_M), M - 1)
        rn = tl.minimum(n0 + tl.arange(0, BLOCK_N), N - 1)
        a_s_ptrs = AS + rm * stride_asm  # MN-major scales ([nk, M] storage): one coalesced row per step
        if B_SCALE_SCALAR:
            b_s_ptrs = BS + (n0 // BLOCK_K) * stride_bsn
        else:
            b_s_ptrs = BS + (rn // b_scale_rows) * stride_bsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(n_k):
            k0 = kb * BLOCK_K
            if USE_TMA:
                a = A.load([m0, k0])
                b = B.load([n0, k0])
            else:
                ks = k0 + tl.arange(0, BLOCK_K)
                mask_k = ks < K
                a = tl.load(A + rm.to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak, mask=mask_k[None, :], other=0.0)
                b = tl.load(B + rn.to(tl.int64)[:, None] * stride_bn + ks[None, :] * stride_bk, mask=mask_k[None, :], other=0.0)
            a_s = tl.load(a_s_ptrs + kb * stride_ask)
            b_s = tl.load(b_s_ptrs + kb * stride_bsk)
            acc = _promote(acc, a, tl.trans(b), _scale(a_s, b_s, B_SCALE_SCALAR), FP8_DOT)
        if USE_TMA:
            C.store([m0, n0], acc.to(C.dtype))
        else:
            cm = m0 + tl.arange(0, BLOCK_M)
            cn = n0 + tl.arange(0, BLOCK_N)
            tl.store(C + cm.to(tl.int64)[:, None] * stride_cm + cn[None, :] * stride_cn, acc.to(C.dtype.element_ty),
                     mask=(cm < M)[:, None] & (cn < N)[None, :])


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _has_tma(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def _tma_layout_ok(*ts: torch.Tensor) -> bool:
    """What a tensor descriptor needs (triton's TensorDescriptor checks): a 16-byte aligned base and
    row strides, unit inner stride. An fp8 [M, K] operand needs K % 16 == 0, a bf16 output N % 8 == 0."""
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
               for t in ts)


def gemm_config(a_q: torch.Tensor, M: int, N: int, K: int) -> dict:
    """Tiles by shape (a starting point for benchmarks/fp8_gemm.py --sweep, not tuned on a GPU yet).

    Interpreter: 32 x 32 tiles and 4 programs (each walks several tiles), no FP8 dot. GPU: 128 x 128
    tiles with 8 warps (two warpgroups: one promotes its partial while the other's wgmma runs; a
    fresh partial plus the accumulator take ~160 registers, where 128 x 256 spills) and 4 stages of
    32 KiB; 64 x 128 with 4 warps and 6 stages when M <= 64 (weight-bound); 128 x 64 when the 128 x
    128 grid would leave over 10% of its waves' SM slots idle and the narrower one wastes less
    (DeepGEMM picks its tile width by the same wave count: 4096 x 2112 is 4.1 waves of 128 x 128 on
    132 SMs, exactly 8 of 128 x 64). TMA on sm90+ (the launcher falls back to pointers where a
    descriptor is not allowed)."""
    if not a_q.is_cuda:
        return dict(BLOCK_M=32, BLOCK_N=32, GROUP_M=2, NUM_SMS=4, USE_TMA=False, FP8_DOT=False)
    sms = _num_sms(a_q.device)
    cfg = dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, NUM_SMS=sms, USE_TMA=_has_tma(a_q.device), FP8_DOT=True,
               num_warps=8, num_stages=4)
    if M <= 64:
        return dict(cfg, BLOCK_M=64, num_warps=4, num_stages=6)

    def idle(bm, bn):  # fraction of the (waves x SMs) slots with no tile
        tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        return (triton.cdiv(tiles, sms) * sms - tiles) / (triton.cdiv(tiles, sms) * sms)

    if idle(128, 128) > 0.1 and idle(128, 64) < idle(128, 128):
        return dict(cfg, BLOCK_N=64, num_warps=4)
    return cfg


def gemm_launch(a_q, a_s, w_q, w_s, out_dtype, block: int, cfg: dict | None = None) -> torch.Tensor:
    """a_q [M, K] e4m3 with a_s [M, ceil(K/block)] (any strides; MN-major is what the kernel reads),
    w_q [N, K] with w_s [ceil(N/block), ceil(K/block)] (blocks) or [N, ceil(K/block)] (rows) ->
    [M, N] in out_dtype. cfg: gemm_config's keys (benchmarks/fp8_gemm.py --sweep passes its own)."""
    M, K = a_q.shape
    N = w_q.shape[0]
    c = torch.empty(M, N, device=a_q.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    grid, args, kwargs = gemm_args(a_q, a_s, w_q, w_s, c, block, cfg or gemm_config(a_q, M, N, K))
    _fp8_gemm_persistent[grid](*args, **kwargs)
    return c


def gemm_args(a_q, a_s, w_q, w_s, c, block: int, cfg: dict) -> tuple[tuple, tuple, dict]:
    """(grid, args, kwargs) of _fp8_gemm_persistent for c = a @ w^T (also what --compile-only compiles)."""
    (M, K), N = a_q.shape, w_q.shape[0]
    cfg = dict(cfg)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    b_scale_rows = block if w_s.shape[0] != N else 1
    if a_s.stride(0) != 1:  # DeepGEMM reads the activation scales MN-major: a K step's BLOCK_M scales are contiguous
        a_s = a_s.t().contiguous().t()
    cfg["USE_TMA"] = cfg["USE_TMA"] and _tma_layout_ok(a_q, w_q, c)
    A, B, C = a_q, w_q, c
    if cfg["USE_TMA"]:
        A = TensorDescriptor.from_tensor(a_q, [bm, block])
        B = TensorDescriptor.from_tensor(w_q, [bn, block])
        C = TensorDescriptor.from_tensor(c, [bm, bn])
    grid = (min(cfg["NUM_SMS"], triton.cdiv(M, bm) * triton.cdiv(N, bn)),)
    args = (A, a_s, B, w_s, C, M, N, K, b_scale_rows, a_q.stride(0), a_q.stride(1), a_s.stride(0), a_s.stride(1),
            w_q.stride(0), w_q.stride(1), w_s.stride(0), w_s.stride(1), c.stride(0), c.stride(1))
    return grid, args, dict(cfg, B_SCALE_SCALAR=b_scale_rows == block and block % bn == 0, BLOCK_K=block)


# ---------------------------------------------------------------------------------------------
# routed experts: grouped GEMM C [rows of e, N] = A [rows of e, K] @ B[e] [K, N]


@triton.jit
def _row_tile_count(OFFSETS, n_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Number of row tiles when each expert's rows are tiled separately (expert_row_tile's numbering)."""
    es = tl.arange(0, BLOCK_E)
    ends = tl.load(OFFSETS + es, mask=es < n_experts, other=0)
    starts = tl.load(OFFSETS + es - 1, mask=(es > 0) & (es < n_experts), other=0)
    return tl.sum((ends - starts + BLOCK_M - 1) // BLOCK_M, axis=0)


@triton.jit
def _fp8_grouped_persistent(A, AS, B, BS, C, OFFSETS, N, K, n_experts,
                            stride_am, stride_ak, stride_asm, stride_ask, stride_be, stride_bk, stride_bn,
                            stride_bse, stride_bsk, stride_bsn, stride_cm, stride_cn,
                            NUM_SMS: tl.constexpr, USE_TMA: tl.constexpr, B_K_MAJOR: tl.constexpr, FP8_DOT: tl.constexpr,
                            B_SCALE_SCALAR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                            GROUP_M: tl.constexpr):
    """C[rows of e, n] = sum over K blocks kb of (A_q[rows, kb] . B_q[e][kb, n]) * AS[rows, kb] * BS[e][kb, n // BLOCK_K].

    A: [M, K] e4m3, rows sorted by expert, one scale per 1 x BLOCK_K tile; B: [E, K, N] e4m3 (any
    strides: dgrad passes w^T as a view), one scale per BLOCK_K x BLOCK_K block. Tiles are (row
    tile of one expert, column tile) pairs, walked persistently in grouped order, so the row tiles
    of an expert sweep its column tiles while they are in L2. USE_TMA: A is a descriptor with
    block [BLOCK_M, BLOCK_K] (a tile's rows past its expert's end belong to the next expert and are
    read but never stored) and B a 3-D descriptor over its storage: [E, N, K] with block [1,
    BLOCK_N, BLOCK_K] when B_K_MAJOR (K contiguous, dgrad), else [E, K, N] with [1, BLOCK_K, BLOCK_N].
    C is always stored through masked pointers (a tile must not write its neighbour expert's rows).
    """
    n_m = _row_tile_count(OFFSETS, n_experts, BLOCK_M, BLOCK_E)
    n_n, n_k = tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), n_m * n_n, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile, n_m, n_n, GROUP_M)
        e, row0, row_end = expert_row_tile(OFFSETS, n_experts, pid_m, BLOCK_M, BLOCK_E)
        n0 = pid_n * BLOCK_N
        rows = tl.minimum(row0 + tl.arange(0, BLOCK_M), row_end - 1)  # clamped as in _fp8_gemm_persistent
        cols = tl.minimum(n0 + tl.arange(0, BLOCK_N), N - 1)
        e64 = e.to(tl.int64)
        a_s_ptrs = AS + rows * stride_asm
        if B_SCALE_SCALAR:  # as in _fp8_gemm_persistent
            b_s_ptrs = BS + e64 * stride_bse + (n0 // BLOCK_K) * stride_bsn
        else:
            b_s_ptrs = BS + e64 * stride_bse + (cols // BLOCK_K) * stride_bsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(n_k):
            k0 = kb * BLOCK_K
            if USE_TMA:
                a = A.load([row0, k0])
                if B_K_MAJOR:
                    b_t = tl.trans(B.load([e, n0, k0]).reshape(BLOCK_N, BLOCK_K))
                else:
                    b_t = B.load([e, k0, n0]).reshape(BLOCK_K, BLOCK_N)
            else:
                ks = k0 + tl.arange(0, BLOCK_K)
                mask_k = ks < K
                a = tl.load(A + rows.to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak, mask=mask_k[None, :], other=0.0)
                b_t = tl.load(B + e64 * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn, mask=mask_k[:, None], other=0.0)
            a_s = tl.load(a_s_ptrs + kb * stride_ask)
            b_s = tl.load(b_s_ptrs + kb * stride_bsk)
            acc = _promote(acc, a, b_t, _scale(a_s, b_s, B_SCALE_SCALAR), FP8_DOT)
        cm = row0 + tl.arange(0, BLOCK_M)
        cn = n0 + tl.arange(0, BLOCK_N)
        tl.store(C + cm.to(tl.int64)[:, None] * stride_cm + cn[None, :] * stride_cn, acc.to(C.dtype.element_ty),
                 mask=(cm < row_end)[:, None] & (cn < N)[None, :])


def grouped_config(a_q: torch.Tensor) -> dict:
    """As gemm_config: small tiles and 4 programs under the interpreter; 128 x 128, 8 warps, 4 stages on a GPU."""
    if not a_q.is_cuda:
        return dict(BLOCK_M=32, BLOCK_N=32, GROUP_M=2, NUM_SMS=4, USE_TMA=False, FP8_DOT=False)
    return dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, NUM_SMS=_num_sms(a_q.device), USE_TMA=_has_tma(a_q.device),
                FP8_DOT=True, num_warps=8, num_stages=4)


def grouped_launch(a_q, a_s, b_q, b_s, offsets_E, out_dtype, block: int, cfg: dict | None = None) -> torch.Tensor:
    """[M, N]: a_q [M, K] with a_s [M, ceil(K/b)]; b_q [E, K, N] with b_s [E, ceil(K/b), ceil(N/b)] (views
    allowed: dgrad passes w^T). cfg: grouped_config's keys (benchmarks/fp8_gemm.py --sweep passes its own)."""
    M, K = a_q.shape
    N = b_q.shape[2]
    c = torch.empty(M, N, device=a_q.device, dtype=out_dtype)
    if M == 0 or N == 0 or K == 0:
        return c.zero_()
    grid, args, kwargs = grouped_args(a_q, a_s, b_q, b_s, offsets_E, c, block, cfg or grouped_config(a_q))
    _fp8_grouped_persistent[grid](*args, **kwargs)
    return c


def grouped_args(a_q, a_s, b_q, b_s, offsets_E, c, block: int, cfg: dict) -> tuple[tuple, tuple, dict]:
    """(grid, args, kwargs) of _fp8_grouped_persistent (also what --compile-only compiles)."""
    (M, K), (E, _, N) = a_q.shape, b_q.shape
    cfg = dict(cfg)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    if a_s.stride(0) != 1:
        a_s = a_s.t().contiguous().t()
    k_major = b_q.stride(1) == 1  # [E, K, N] view of [E, N, K] storage
    b_store = b_q.transpose(1, 2) if k_major else b_q
    cfg["USE_TMA"] = cfg["USE_TMA"] and _tma_layout_ok(a_q, b_store)
    A, B = a_q, b_q
    if cfg["USE_TMA"]:
        A = TensorDescriptor.from_tensor(a_q, [bm, block])
        B = TensorDescriptor.from_tensor(b_store, [1, bn, block] if k_major else [1, block, bn])
    tiles = (triton.cdiv(M, bm) + E) * triton.cdiv(N, bn)  # an upper bound: the kernel counts the real ones
    args = (A, a_s, B, b_s, c, offsets_E, N, K, E, *a_q.stride(), *a_s.stride(), *b_q.stride(), *b_s.stride(), *c.stride())
    return (min(cfg["NUM_SMS"], tiles),), args, dict(cfg, B_K_MAJOR=k_major, B_SCALE_SCALAR=block % bn == 0, BLOCK_K=block,
                                                    BLOCK_E=max(16, triton.next_power_of_2(E)))


@triton.jit
def _fp8_grouped_dw(XT, XS, DYT, DYS, DW, OFFSETS, K, N,
                    stride_xk, stride_xm, stride_xsk, stride_xsm, stride_dn, stride_dm, stride_dsn, stride_dsm,
                    stride_we, stride_wk, stride_wn,
                    FP8_DOT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """dw[e][ks, cols] = sum over the rows r of expert e of x[r, ks] * dy[r, cols], both operands
    quantised along the tokens: XT = x^T [K, M] and DYT = dy^T [N, M] in e4m3 with one scale per
    1 x BLOCK tile of tokens. The loop walks the global BLOCK-aligned token tiles that overlap the
    expert's rows (a tile may straddle two experts: its rows outside this expert are masked), so
    each step has one scale per k and per n. An expert with no rows gets dw = 0."""
    e = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k, mask_n = ks < K, cols < N
    ks, cols = ks.to(tl.int64), cols.to(tl.int64)
    start = tl.where(e > 0, tl.load(OFFSETS + tl.maximum(e - 1, 0)), 0)
    end = tl.load(OFFSETS + e)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for t in range(start // BLOCK, tl.cdiv(end, BLOCK)):
        rows = t * BLOCK + tl.arange(0, BLOCK)
        mask_m = (rows >= start) & (rows < end)
        rows = rows.to(tl.int64)
        a = tl.load(XT + ks[:, None] * stride_xk + rows[None, :] * stride_xm, mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        b = tl.load(DYT + cols[None, :] * stride_dn + rows[:, None] * stride_dm, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        x_s = tl.load(XS + ks * stride_xsk + t * stride_xsm, mask=mask_k, other=0.0)
        dy_s = tl.load(DYS + cols * stride_dsn + t * stride_dsm, mask=mask_n, other=0.0)
        acc = _promote(acc, a, b, x_s[:, None] * dy_s[None, :], FP8_DOT)
    tl.store(DW + e.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn, acc.to(DW.dtype.element_ty),
             mask=mask_k[:, None] & mask_n[None, :])


def grouped_dw_launch(xt_q, xt_s, dyt_q, dyt_s, offsets_E, E: int, dtype, block: int) -> torch.Tensor:
    """dw [E, K, N] = x^T dy per expert from XT [K, M] and DYT [N, M] quantised along the tokens.
    One program per (expert, dw tile), not persistent (see fp8.py's docstring), tiles unchanged."""
    K, M = xt_q.shape
    N = dyt_q.shape[0]
    dw = torch.empty(E, K, N, device=xt_q.device, dtype=dtype)
    if M == 0 or K == 0 or N == 0:
        return dw.zero_()
    cuda = xt_q.is_cuda
    bk = bn = 128 if cuda else 32
    launch = dict(num_warps=8, num_stages=3) if cuda else {}
    _fp8_grouped_dw[(E, triton.cdiv(K, bk), triton.cdiv(N, bn))](
        xt_q, xt_s, dyt_q, dyt_s, dw, offsets_E, K, N, *xt_q.stride(), *xt_s.stride(), *dyt_q.stride(), *dyt_s.stride(),
        *dw.stride(), FP8_DOT=cuda, BLOCK=block, BLOCK_K=bk, BLOCK_N=bn, **launch)
    return dw
