"""MoE expert dispatch: routing metadata, permute / unpermute, and a grouped GEMM over contiguous
expert segments — the pieces of the routed-expert MLP (issue #4, item 3):

    meta = routing_metadata(topk_ids_TK, n_experts)
    x_PD = permute(x_TD, meta)                                # rows sorted by expert
    h_PI = swiglu(grouped_mm(x_PD, w1_EDI, meta.offsets_E), grouped_mm(x_PD, w3_EDI, meta.offsets_E))
    y_TD = unpermute(grouped_mm(h_PI, w2_EID, meta.offsets_E), meta, weights_TK)

Shapes: T tokens, k experts per token, P = T*k (token, expert) pairs, E experts, D/K/N/I feature sizes.
A pair is identified by its flat index t*k + j into topk_ids; "sorted position" is its row in the
expert-sorted layout.

- `routing_metadata` is torch (a stable sort and a searchsorted, no host sync, deterministic).
- `permute` gathers rows; its backward sums each token's k rows (a gather, no atomics).
- `unpermute` computes out[t] = sum_j w[t,j] * y[pos(t,j)] with the routing weights applied
  inside the kernel, fp32 accumulation; its backward gives dy (scaled) and d(weights) in one pass.
- `grouped_mm` launches one program per (row tile, column tile); each program finds its expert
  from the offsets itself (a cumsum over per-expert tile counts), so there is no host sync and no
  host-side tile table. Backward: dx = grouped_mm(dy, w^T) (same kernel on a transposed view),
  dw[e] = x_e^T dy_e by a second kernel with one program per (expert, K tile, N tile); experts with
  no rows get dw[e] = 0.

Each op has a pure-torch reference (`*_reference`, the loop over segments for grouped_mm) that
the tests compare against. The torch path is the reference, except that on CPU grouped_mm calls
torch._grouped_mm when the strides allow (the same per-segment matmuls, bit-identical here, without
the Python loop). SPUTNIK_KERNELS picks the path (sputnik_kernels/dispatch.py).
Under torch.compile (issue 24) grouped_mm runs as the custom op `sputnik::grouped_mm` (same
kernels inside, static output shape outside) and permute / unpermute as their references, which
inductor fuses; nothing in the compiled path reads the offsets on the host.

Test: `pytest tests/kernels/test_kernels_moe.py`; benchmark: `python benchmarks/moe_dispatch.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sputnik_kernels.dispatch import use_triton

ROW_BLOCK = 1024  # feature columns per step in permute / unpermute


@dataclass(frozen=True)
class RoutingMeta:
    """Where each (token, expert) pair goes. P = T*k pairs; pair id = t*k + j."""

    counts_E: torch.Tensor  # int32: pairs routed to each expert
    offsets_E: torch.Tensor  # int32: end row of each expert's segment (cumulative counts)
    padded_offsets_E: torch.Tensor  # int32: segment ends if each is padded to a multiple of `block` rows
    pair_P: torch.Tensor  # int64: pair id at each sorted position (stable: token order within an expert)
    token_P: torch.Tensor  # int64: token at each sorted position (pair_P // k)
    pos_P: torch.Tensor  # int64: sorted position of each pair id (inverse of pair_P)
    n_tokens: int
    topk: int
    block: int


def routing_metadata(topk_ids_TK: torch.Tensor, n_experts: int, block: int = 128) -> RoutingMeta:
    """Sort the (token, expert) pairs by expert into contiguous segments.

    `block` sets `padded_offsets_E` = cumsum(ceil(counts / block) * block), the segment ends when
    each expert is padded to whole row blocks (the layout of block-scaled FP8, 128 rows as in
    DeepSeek-V3, and of GEMMs that need aligned segments). With block = its BLOCK_M,
    padded_offsets / block are the row-tile boundaries `grouped_mm` derives in-kernel.
    """
    if topk_ids_TK.dim() != 2:
        raise ValueError(f"routing_metadata: topk_ids must be [tokens, k], got shape {tuple(topk_ids_TK.shape)}")
    T, k = topk_ids_TK.shape
    ids_sorted, pair = topk_ids_TK.reshape(-1).sort(stable=True)
    experts = torch.arange(n_experts, device=ids_sorted.device, dtype=ids_sorted.dtype)
    offsets = torch.searchsorted(ids_sorted, experts, right=True).to(torch.int32)  # bincount would sync on CUDA
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    padded = (torch.div(counts + block - 1, block, rounding_mode="floor") * block).cumsum(0).to(torch.int32)
    pos = torch.empty_like(pair).scatter_(0, pair, torch.arange(pair.numel(), device=pair.device))
    return RoutingMeta(counts, offsets, padded, pair, pair // k, pos, T, k, block)


# ---------------------------------------------------------------------------------------------
# references


def permute_reference(x_TD: torch.Tensor, meta: RoutingMeta) -> torch.Tensor:
    return x_TD.index_select(0, meta.token_P)  # backward: index_add (not index_put)


def unpermute_reference(y_PN: torch.Tensor, meta: RoutingMeta, weights_TK: torch.Tensor) -> torch.Tensor:
    scaled = y_PN * weights_TK.reshape(-1)[meta.pair_P].unsqueeze(-1)
    out = torch.zeros(meta.n_tokens, y_PN.shape[1], device=y_PN.device, dtype=scaled.dtype)
    return out.index_add_(0, meta.token_P, scaled)


def grouped_mm_reference(x_MK: torch.Tensor, w_EKN: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """out[rows of e] = x[rows of e] @ w[e]: one matmul per contiguous expert segment."""
    ends = offsets_E.tolist()
    if ends and ends[-1] != x_MK.shape[0]:
        raise ValueError(f"grouped_mm: offsets end at row {ends[-1]} but x has {x_MK.shape[0]} rows")
    sizes = [end - start for start, end in zip([0] + ends[:-1], ends)]
    return torch.cat([xe @ w_EKN[e] for e, xe in enumerate(x_MK.split(sizes))])


# ---------------------------------------------------------------------------------------------
# permute / unpermute kernels: one program per row, looping over feature blocks


@triton.jit
def _permute_fwd(X, TOKEN, Y, D, stride_x, stride_y, BLOCK: tl.constexpr):
    """y[p] = x[token[p]]."""
    p = tl.program_id(0).to(tl.int64)
    t = tl.load(TOKEN + p).to(tl.int64)
    for d0 in range(0, D, BLOCK):
        cols = d0 + tl.arange(0, BLOCK)
        mask = cols < D
        tl.store(Y + p * stride_y + cols, tl.load(X + t * stride_x + cols, mask=mask), mask=mask)


@triton.jit
def _unpermute_fwd(Y, W, POS, OUT, topk, N, stride_y, stride_o, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    """out[t] = sum_j w[t, j] * y[pos[t*k + j]] (w = 1 without HAS_W), fp32 accumulation."""
    t = tl.program_id(0).to(tl.int64)
    for n0 in range(0, N, BLOCK):
        cols = n0 + tl.arange(0, BLOCK)
        mask = cols < N
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in range(0, topk):
            row = tl.load(POS + t * topk + j).to(tl.int64)
            y = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_W:
                y = y * tl.load(W + t * topk + j).to(tl.float32)
            acc += y
        tl.store(OUT + t * stride_o + cols, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _unpermute_bwd(DOUT, Y, W, PAIR, DY, DW, topk, N, stride_do, stride_y, stride_dy,
                   NEED_DW: tl.constexpr, BLOCK: tl.constexpr):
    """For sorted row p of pair (t, j): dy[p] = w[t, j] * dout[t]; dw[t, j] = <dout[t], y[p]>."""
    p = tl.program_id(0).to(tl.int64)
    pair = tl.load(PAIR + p).to(tl.int64)
    t = pair // topk
    w = tl.load(W + pair).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for n0 in range(0, N, BLOCK):
        cols = n0 + tl.arange(0, BLOCK)
        mask = cols < N
        g = tl.load(DOUT + t * stride_do + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DY + p * stride_dy + cols, (w * g).to(DY.dtype.element_ty), mask=mask)
        if NEED_DW:
            acc += g * tl.load(Y + p * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    if NEED_DW:
        tl.store(DW + pair, tl.sum(acc, axis=0).to(DW.dtype.element_ty))


def _row_block(n: int) -> int:
    return min(ROW_BLOCK, triton.next_power_of_2(max(n, 1)))


def _gather_rows(x_TD: torch.Tensor, token_P: torch.Tensor) -> torch.Tensor:
    y = x_TD.new_empty(token_P.numel(), x_TD.shape[1])
    if y.numel():
        _permute_fwd[(y.shape[0],)](x_TD, token_P, y, y.shape[1], x_TD.stride(0), y.stride(0), BLOCK=_row_block(y.shape[1]))
    return y


def _combine_rows(y_PN: torch.Tensor, pos_P: torch.Tensor, weights_TK: torch.Tensor | None, n_tokens: int, topk: int,
                  dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(n_tokens, y_PN.shape[1], device=y_PN.device, dtype=dtype)
    if out.numel():
        w = weights_TK if weights_TK is not None else pos_P  # placeholder pointer, never read without HAS_W
        _unpermute_fwd[(n_tokens,)](y_PN, w, pos_P, out, topk, y_PN.shape[1], y_PN.stride(0), out.stride(0),
                                    HAS_W=weights_TK is not None, BLOCK=_row_block(y_PN.shape[1]))
    return out


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, token_P, pos_P, topk):
        ctx.save_for_backward(pos_P)
        ctx.topk, ctx.n_tokens = topk, x_TD.shape[0]
        return _gather_rows(x_TD.contiguous(), token_P)

    @staticmethod
    def backward(ctx, dy_PD):
        (pos_P,) = ctx.saved_tensors
        dx = _combine_rows(dy_PD.contiguous(), pos_P, None, ctx.n_tokens, ctx.topk, dy_PD.dtype)
        return dx, None, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_PN, weights_TK, pair_P, pos_P, topk):
        y, w = y_PN.contiguous(), weights_TK.contiguous()
        ctx.save_for_backward(y, w, pair_P)
        ctx.topk = topk
        return _combine_rows(y, pos_P, w, w.shape[0], topk, torch.promote_types(y.dtype, w.dtype))

    @staticmethod
    def backward(ctx, dout_TN):
        y, w, pair_P = ctx.saved_tensors
        dout = dout_TN.contiguous()
        need_dw = ctx.needs_input_grad[1]
        dy, dw = torch.empty_like(y), torch.zeros_like(w)
        if dy.numel():
            _unpermute_bwd[(y.shape[0],)](dout, y, w, pair_P, dy, dw, ctx.topk, y.shape[1], dout.stride(0), y.stride(0),
                                          dy.stride(0), NEED_DW=need_dw, BLOCK=_row_block(y.shape[1]))
        return dy, (dw if need_dw else None), None, None, None


def permute(x_TD: torch.Tensor, meta: RoutingMeta) -> torch.Tensor:
    """x rows in expert-sorted order, [T*k, D] (each token once per chosen expert)."""
    if x_TD.dim() != 2 or x_TD.shape[0] != meta.n_tokens:
        raise ValueError(f"permute: x must be [{meta.n_tokens}, D] as routed, got shape {tuple(x_TD.shape)}")
    if use_triton(x_TD) and not torch.compiler.is_compiling():  # compiled: inductor fuses the gather itself
        return _Permute.apply(x_TD, meta.token_P, meta.pos_P, meta.topk)
    return permute_reference(x_TD, meta)


def unpermute(y_PN: torch.Tensor, meta: RoutingMeta, weights_TK: torch.Tensor) -> torch.Tensor:
    """[T, N]: out[t] = sum_j weights[t, j] * y[sorted position of (t, j)], in the promoted dtype of y
    and weights. Differentiable in y and the routing weights."""
    P = meta.n_tokens * meta.topk
    if y_PN.dim() != 2 or y_PN.shape[0] != P:
        raise ValueError(f"unpermute: y must be [{P}, N] (tokens x k rows, expert-sorted), got shape {tuple(y_PN.shape)}")
    if tuple(weights_TK.shape) != (meta.n_tokens, meta.topk):
        raise ValueError(f"unpermute: weights must be [{meta.n_tokens}, {meta.topk}] like topk_ids, got {tuple(weights_TK.shape)}")
    if use_triton(y_PN) and not torch.compiler.is_compiling():  # compiled: inductor fuses the reference
        return _Unpermute.apply(y_PN, weights_TK, meta.pair_P, meta.pos_P, meta.topk)
    return unpermute_reference(y_PN, meta, weights_TK)


# ---------------------------------------------------------------------------------------------
# grouped GEMM


@triton.jit
def expert_row_tile(OFFSETS, n_experts, pid_m, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Row tile pid_m of an expert-sorted grouped GEMM -> (expert e, first row, the expert's end row).

    Row tiles are numbered expert by expert (ceil(count_e / BLOCK_M) each), so every tile holds rows
    of one expert only; e is found from a cumsum of those counts (no host sync, no tile table).
    e == n_experts for the spare programs past the last tile (the launch grid over-provisions by at
    most one partial tile per expert)."""
    es = tl.arange(0, BLOCK_E)
    ends = tl.load(OFFSETS + es, mask=es < n_experts, other=0)
    starts = tl.load(OFFSETS + es - 1, mask=(es > 0) & (es < n_experts), other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tile_ends = tl.cumsum(tiles, axis=0)
    e = tl.sum((tile_ends <= pid_m).to(tl.int32), axis=0)
    mine = es == e
    first_tile = tl.sum(tl.where(mine, tile_ends - tiles, 0), axis=0)
    row_end = tl.sum(tl.where(mine, ends, 0), axis=0)
    row0 = tl.sum(tl.where(mine, starts, 0), axis=0) + (pid_m - first_tile) * BLOCK_M
    return e, row0, row_end


@triton.jit
def _grouped_mm_fwd(X, W, Y, OFFSETS, N, K, n_experts,
                    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_yn,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_E: tl.constexpr):
    """y[rows of e, cols] = x[rows of e] @ w[e][:, cols] for row tile program_id(0).

    Row tiles are numbered expert by expert (ceil(count_e / BLOCK_M) each); the program finds its
    expert e from a cumsum of those counts. Programs past the last tile do nothing.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, row0, row_end = expert_row_tile(OFFSETS, n_experts, pid_m, BLOCK_M, BLOCK_E)
    if e < n_experts:
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = rows < row_end, cols < N
        rows = rows.to(tl.int64)
        w_e = W + e.to(tl.int64) * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask_k = ks < K
            a = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w_e + ks[:, None] * stride_wk + cols[None, :] * stride_wn, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        tl.store(Y + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _grouped_mm_dw(X, DY, DW, OFFSETS, K, N,
                   stride_xm, stride_xk, stride_dym, stride_dyn, stride_we, stride_wk, stride_wn,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dw[e][ks, cols] = x[rows of e, ks]^T @ dy[rows of e, cols]; zero for an expert with no rows."""
    e = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k, mask_n = ks < K, cols < N
    start = tl.where(e > 0, tl.load(OFFSETS + tl.maximum(e - 1, 0)), 0)
    end = tl.load(OFFSETS + e)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask_m = rows < end
        rows = rows.to(tl.int64)
        a = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
    tl.store(DW + e.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn, acc.to(DW.dtype.element_ty),
             mask=mask_k[:, None] & mask_n[None, :])


def _gemm_config(x: torch.Tensor) -> dict:
    """Tile sizes: small under the CPU interpreter (speed; still exercises partial tiles), the
    Triton matmul tutorial's shapes on a GPU (untuned here). fp32 follows torch's TF32 switch."""
    precision = "tf32" if x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"  # fp32 operands only
    if not x.is_cuda:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, PRECISION=precision)
    if x.dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, PRECISION=precision, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, PRECISION=precision, num_warps=8, num_stages=3)


def _grouped_mm_launch(x_MK: torch.Tensor, w_EKN: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Forward kernel; w may be a strided view (the backward passes w^T without copying)."""
    M, K = x_MK.shape
    E, _, N = w_EKN.shape
    y = x_MK.new_empty(M, N)
    if M == 0 or N == 0 or K == 0:
        return y.zero_()
    cfg = _gemm_config(x_MK)
    # at most one partial tile per expert on top of ceil(M / BLOCK_M) full ones
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) + E, triton.cdiv(N, cfg["BLOCK_N"]))
    _grouped_mm_fwd[grid](x_MK, w_EKN, y, offsets_E, N, K, E, *x_MK.stride(), *w_EKN.stride(), *y.stride(),
                          BLOCK_E=max(16, triton.next_power_of_2(E)), **cfg)
    return y


def _grouped_mm_dw_launch(x_MK: torch.Tensor, dy_MN: torch.Tensor, offsets_E: torch.Tensor, w_EKN: torch.Tensor) -> torch.Tensor:
    E, K, N = w_EKN.shape
    dw = torch.empty(E, K, N, device=w_EKN.device, dtype=w_EKN.dtype)
    if x_MK.shape[0] == 0 or K == 0 or N == 0:
        return dw.zero_()
    cfg = _gemm_config(x_MK)
    grid = (E, triton.cdiv(K, cfg["BLOCK_K"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _grouped_mm_dw[grid](x_MK, dy_MN, dw, offsets_E, K, N, *x_MK.stride(), *dy_MN.stride(), *dw.stride(), **cfg)
    return dw


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MK, w_EKN, offsets_E):
        x = x_MK.contiguous()
        ctx.save_for_backward(x, w_EKN, offsets_E)
        return _grouped_mm_launch(x, w_EKN, offsets_E)

    @staticmethod
    def backward(ctx, dy_MN):
        x, w, offsets = ctx.saved_tensors
        dy = dy_MN.contiguous()
        dx = _grouped_mm_launch(dy, w.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
        dw = _grouped_mm_dw_launch(x, dy, offsets, w) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_mm(x_MK: torch.Tensor, w_EKN: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """[M, N]: rows of x sorted by expert, offsets[e] = end row of expert e (offsets[-1] must be M);
    out[rows of e] = x[rows of e] @ w[e]. Differentiable in x and w. Under autocast both run in
    the autocast dtype, as a matmul would."""
    if x_MK.dim() != 2 or w_EKN.dim() != 3 or x_MK.shape[1] != w_EKN.shape[1]:
        raise ValueError(f"grouped_mm: need x [M, K] and w [E, K, N], got {tuple(x_MK.shape)} and {tuple(w_EKN.shape)}")
    if offsets_E.shape != (w_EKN.shape[0],):
        raise ValueError(f"grouped_mm: offsets must have one end row per expert ({w_EKN.shape[0]}), got shape {tuple(offsets_E.shape)}")
    if torch.is_autocast_enabled(x_MK.device.type):
        dtype = torch.get_autocast_dtype(x_MK.device.type)
        x_MK, w_EKN = x_MK.to(dtype), w_EKN.to(dtype)
    if x_MK.dtype != w_EKN.dtype:
        raise ValueError(f"grouped_mm: x is {x_MK.dtype} but w is {w_EKN.dtype}; cast one (or use autocast)")
    if torch.compiler.is_compiling():
        return _grouped_mm_op(x_MK, w_EKN, offsets_E.to(device=x_MK.device, dtype=torch.int32))
    if use_triton(x_MK):
        return _GroupedMM.apply(x_MK, w_EKN, offsets_E.to(device=x_MK.device, dtype=torch.int32))
    if _cpu_grouped_mm_fits(x_MK, w_EKN):
        return torch._grouped_mm(x_MK, w_EKN, offsets_E.to(torch.int32))
    return grouped_mm_reference(x_MK, w_EKN, offsets_E)


def _cpu_grouped_mm_fits(x_MK: torch.Tensor, w_EKN: torch.Tensor) -> bool:
    """torch._grouped_mm on CPU (same per-segment matmuls as the loop, without the Python loop,
    1.3-1.6x faster at the tiny preset) takes fp32/bf16/fp16 with 16-byte-aligned strides."""
    if x_MK.device.type != "cpu" or not hasattr(torch, "_grouped_mm") or x_MK.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    size = x_MK.element_size()
    return all(t.data_ptr() % 16 == 0 and all(s == 1 or s * size % 16 == 0 for s in t.stride()) for t in (x_MK, w_EKN))


# ---------------------------------------------------------------------------------------------
# grouped GEMM as a custom op, for torch.compile (issue 24)
#
# Under torch.compile, grouped_mm calls `sputnik::grouped_mm`: dynamo and inductor see one opaque
# op with a static output shape ([M, N] from the input shapes) instead of tracing into it. Tracing
# would break the graph: the reference loop reads the offsets on the host, the CPU meta function of
# torch._grouped_mm accepts bf16 only (its CPU kernel takes fp32 too), and Triton launches under
# the interpreter cannot be traced. Inside, each op runs the same kernels as the eager path (the
# Triton kernels, torch._grouped_mm, or the loop) and the backward is the same pair of GEMMs, so
# compiled and eager agree bit for bit here.


@torch.library.custom_op("sputnik::grouped_mm", mutates_args=())
def _grouped_mm_op(x_MK: torch.Tensor, w_EKN: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    if use_triton(x_MK):
        return _grouped_mm_launch(x_MK.contiguous(), w_EKN, offsets_E)
    if _cpu_grouped_mm_fits(x_MK, w_EKN):
        return torch._grouped_mm(x_MK, w_EKN, offsets_E)
    return grouped_mm_reference(x_MK, w_EKN, offsets_E)


@_grouped_mm_op.register_fake
def _(x_MK, w_EKN, offsets_E):
    return x_MK.new_empty(x_MK.shape[0], w_EKN.shape[2])


@torch.library.custom_op("sputnik::grouped_mm_dw", mutates_args=())
def _grouped_mm_dw_op(x_MK: torch.Tensor, dy_MN: torch.Tensor, offsets_E: torch.Tensor, w_EKN: torch.Tensor) -> torch.Tensor:
    """dw[e] = x[rows of e]^T @ dy[rows of e], [E, K, N] like w (zero for an expert with no rows)."""
    if use_triton(x_MK):
        return _grouped_mm_dw_launch(x_MK.contiguous(), dy_MN.contiguous(), offsets_E, w_EKN)
    if _cpu_grouped_mm_fits(x_MK.t(), dy_MN):
        return torch._grouped_mm(x_MK.t(), dy_MN, offsets_E)  # what torch._grouped_mm's own backward runs
    ends = offsets_E.tolist()
    sizes = [end - start for start, end in zip([0] + ends[:-1], ends)]
    return torch.stack([xe.t() @ dye for xe, dye in zip(x_MK.split(sizes), dy_MN.split(sizes))]).to(w_EKN.dtype)


@_grouped_mm_dw_op.register_fake
def _(x_MK, dy_MN, offsets_E, w_EKN):
    return w_EKN.new_empty(w_EKN.shape)


def _grouped_mm_op_setup(ctx, inputs, output):
    x_MK, w_EKN, offsets_E = inputs
    ctx.save_for_backward(x_MK, w_EKN, offsets_E)


def _grouped_mm_op_backward(ctx, dy_MN):
    x_MK, w_EKN, offsets_E = ctx.saved_tensors
    dx = _grouped_mm_op(dy_MN, w_EKN.transpose(1, 2), offsets_E) if ctx.needs_input_grad[0] else None
    dw = _grouped_mm_dw_op(x_MK, dy_MN, offsets_E, w_EKN) if ctx.needs_input_grad[1] else None
    return dx, dw, None


_grouped_mm_op.register_autograd(_grouped_mm_op_backward, setup_context=_grouped_mm_op_setup)
