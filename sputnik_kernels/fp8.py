"""FP8 e4m3 block-scaled quantisation, GEMM and Linear, as in DeepSeek-V3 (section 3.3; issue #4, item 4).

    q_x, s_x = fp8_quantize(x_MK)            # activations: one scale per 1 x 128 tile
    q_w, s_w = fp8_quantize_weight(w_NK)     # weights: one scale per 128 x 128 block
    y_MN = fp8_gemm(q_x, s_x, q_w, s_w)      # x @ w.T, scales applied per K block, fp32 accumulation
    y = fp8_linear(x, w)                     # autograd: forward, dgrad and wgrad all on FP8 operands

Scales: s = max(amax, AMAX_FLOOR) / 448 per tile, q = round_e4m3(clamp(x / s, ±448)) (round to
nearest even), so x ≈ q * s with |x - q*s| <= 2^-4 |x| + 2^-10 s. Scales stay fp32.

GEMM (kernels in sputnik_kernels/fp8_matmul.py; issue 24), built the way DeepGEMM does it:
- Promotion: K is walked in steps of the quantisation block; each step's partial product is a
  fresh tl.dot (FP8 on sm89+), multiplied in fp32 by its row scales a_s[:, k] and its weight block
  scale (one scalar per step when a column tile lies inside one 128-wide block, else one per
  column) and added to an fp32 accumulator: the "promotion to CUDA cores" of V3 section 3.3.2. It
  cannot be hoisted out of the loop (the scales differ per K block), and it keeps long K exact
  (the tensor cores hold only ~14 bits within a block). The second operand's scales are per block
  x block (a weight) or per 1 x block row (an activation-like operand, as in wgrad); fp8_gemm
  tells them apart by shape.
- Persistent grid: one program per SM walks output tiles p, p + SMs, ... in grouped order (GROUP_M
  row tiles share each column tile while it is in L2), the tile loop flattened into the K loop so
  the next tile's loads overlap this one's end (Triton's persistent matmul tutorial). The grouped
  GEMM does the same over (expert row tile, column tile) pairs; its old launch order streamed all
  of A once per column tile.
- Loads: on sm90+ the operand tiles come through TMA (host-built tensor descriptors, zero-filled
  past the edges) and the dense GEMM's output leaves through a TMA store; where a descriptor is not
  allowed (rows not 16-byte aligned: K % 16 != 0 in FP8), elsewhere, and in the interpreter by
  default, through pointer loads (software pipelined with cp.async on a GPU). Activation scales are
  read MN-major ([nk, M] storage, as DeepGEMM requires): one coalesced row of BLOCK_M scales per K
  step; the quantiser writes them that way for fp8_linear and fp8_grouped_mm, the launcher
  transposes any others.
- Tiles for Hopper: 128 x 128 x 128, 8 warps, 4 stages; 64 rows when M <= 64, 64 columns when that
  fills the SMs' waves better (fp8_matmul.gemm_config). Compiled for sm90 without a GPU
  (`python benchmarks/fp8_gemm.py --compile-only`) they take 160-230 registers, spill nothing and
  feed the K loop by TMA (the previous dense kernel, which measured 0.55-0.72x of cuBLAS bf16 on
  an H100, compiles to 243 registers fed by cp.async; the previous grouped kernel pipelined only
  part of its loads). Whether this reaches the targets (1.3x bf16 dense, 1.2x grouped) is for a
  GPU run to show.

fp8_linear (y = x @ W^T, W the high-precision master weight, quantised afresh each call):
- forward: x per 1x128 along K, W per 128x128 block.
- dgrad dx = dy @ W: dy per 1x128 along N (the reduction dim); W^T reuses the forward's blocks
  (a 128x128 block grid is transposable: only q and the scale grid are transposed).
- wgrad dW = dy^T @ x reduces over tokens, so both operands are quantised per 1x128 tile *along
  the token dimension* (dy^T and x^T per row, i.e. 128x1 tiles of dy and x), as DeepSeek-V3 does
  for its backward ("1x128 in the forward, 128x1 in the backward"). x is saved in its own
  precision and quantised along tokens in the backward (DeepSeek caches it in FP8; that saves
  memory but is not needed for the numerics).
fp8_grouped_mm does the same for the stacked routed-expert weights [E, K, N] with rows sorted by
expert: a persistent grouped GEMM whose row tiles each belong to one expert (as in
sputnik_kernels.moe) and whose K loop applies the block scales as above; dgrad reuses it on w's
transposed view, which is K-major: the only layout FP8 wgmma reads. The forward's [E, K, N] tiles
are N-major and Triton transposes each through registers into shared memory; benchmarks/fp8_gemm.py
times the forward on a K-major copy beside it, to show whether a second weight layout would pay.
wgrad (one program per expert and dw tile, not persistent: E x K/128 x N/128 programs, thousands at
DeepSeek-V3 shapes) walks the 128-token quantisation tiles that overlap the expert's rows, masking
the rows of a tile that belong to its neighbours. Compiled for sm90 its loads are not pipelined
(they are once that per-row mask along the contiguous token dimension is dropped, presumably as
cp.async cannot copy single masked bytes): the next kernel to rework, e.g. TMA loads with the mask
applied in registers. `fp8_grouped_mm_reference`
emulates it in torch (quantise, dequantise, torch grouped GEMM).

Interpreter: Triton's interpreter converts fp32 -> fp8 by truncation without saturation (checked on
Triton 3.9), so under TRITON_INTERPRET=1 (CPU tensors) the quantiser rounds to the e4m3 grid in
fp32 itself (ROUND_IN_FP32) and the cast that follows is exact; the GEMM upcasts the e4m3 values
to fp32 for tl.dot (exact). On CUDA the quantiser uses the hardware round-to-nearest cast and
the GEMM an FP8 tl.dot. The interpreter also runs the tensor-descriptor (TMA) path when a config
asks for it, so the tests cover both load paths; only the compiled Hopper code needs a GPU. Triton
has no e4m3 before sm89 (A100): there the torch references run. The torch references
(`*_reference`) emulate the same with torch.float8_e4m3fn on any device.

Test: `pytest tests/kernels/test_kernels_fp8.py`; benchmark: `python benchmarks/fp8_gemm.py [--sweep]`
(on CPU: `--compile-only`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sputnik_kernels.dispatch import use_triton
from sputnik_kernels.fp8_matmul import gemm_launch, grouped_dw_launch, grouped_launch
from sputnik_kernels.moe import grouped_mm

FP8_MAX = 448.0  # largest finite e4m3fn value
# Smallest amax a scale is computed from (zero tiles get q = 0 and a finite scale). DeepGEMM's
# tests clamp at 1e-4, but gradient tiles are often smaller than that and the clamp would map them
# onto a sliver of e4m3's range (amax 1e-7 would top out at q = 0.45), so this floor only guards
# the division.
AMAX_FLOOR = 1e-12
FP8_DTYPE = torch.float8_e4m3fn


def _use_triton(x: torch.Tensor) -> bool:
    """sputnik_kernels.dispatch's choice, except on GPUs without e4m3 (before sm89), where torch emulates."""
    return use_triton(x) and (not x.is_cuda or torch.cuda.get_device_capability(x.device) >= (8, 9))


def _check_block(block: int) -> None:
    if block < 16 or block & (block - 1):
        raise ValueError(f"fp8: block must be a power of two >= 16 (tl.dot needs K >= 16), got {block}")


# ---------------------------------------------------------------------------------------------
# references (torch; any device)


def _pad_to(x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad the last len(sizes) dims up to sizes (no copy when nothing is missing)."""
    pad = [p for size, n in zip(reversed(sizes), reversed(x.shape)) for p in (0, size - n)]
    return torch.nn.functional.pad(x, pad) if any(pad) else x


def fp8_quantize_reference(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x[..., K] -> (q float8_e4m3fn [..., K], scale float32 [..., ceil(K/block)]), per 1 x block tile."""
    K = x.shape[-1]
    nb = triton.cdiv(K, block)
    xp = _pad_to(x.float(), (nb * block,)).unflatten(-1, (nb, block))
    scale = xp.abs().amax(-1).clamp(min=AMAX_FLOOR) / FP8_MAX
    q = (xp / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.flatten(-2)[..., :K], scale


def fp8_quantize_weight_reference(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w[..., N, K] -> (q [..., N, K], scale float32 [..., ceil(N/block), ceil(K/block)]), per block x block."""
    N, K = w.shape[-2:]
    nn_, nk = triton.cdiv(N, block), triton.cdiv(K, block)
    wp = _pad_to(w.float(), (nn_ * block, nk * block))
    wp = wp.unflatten(-1, (nk, block)).unflatten(-3, (nn_, block))  # [..., nn, b, nk, b]
    scale = wp.abs().amax(dim=(-3, -1)).clamp(min=AMAX_FLOOR) / FP8_MAX  # [..., nn, nk]
    q = (wp / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.flatten(-2).flatten(-3, -2)[..., :N, :K], scale


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Inverse of fp8_quantize, in fp32: q[..., K] * scale per 1 x block tile."""
    return q.float() * scale.repeat_interleave(block, dim=-1)[..., : q.shape[-1]]


def fp8_dequantize_weight(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Inverse of fp8_quantize_weight, in fp32."""
    N, K = q.shape[-2:]
    s = scale.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :N, :K]
    return q.float() * s


def fp8_gemm_reference(a_q, a_scale, w_q, w_scale, out_dtype=torch.bfloat16, block: int = 128) -> torch.Tensor:
    """Dequantise both operands to fp32 and multiply: a @ w.T."""
    a = fp8_dequantize(a_q, a_scale, block)
    w = fp8_dequantize(w_q, w_scale, block) if w_scale.shape[0] == w_q.shape[0] else fp8_dequantize_weight(w_q, w_scale, block)
    return (a @ w.T).to(out_dtype)


# ---------------------------------------------------------------------------------------------
# quantisation kernels


@triton.jit
def _round_to_e4m3(y):
    """Round fp32 y (|y| <= 448) to the nearest e4m3 value (ties to even), in fp32: adding
    2^(e+20) to |y| in binade e leaves fp32 spacing 2^(e-3), e4m3's; e >= -6 covers subnormals."""
    a = tl.abs(y)
    e = tl.maximum((a.to(tl.int32, bitcast=True) >> 23) - 127, -6)
    big = ((e + 147) << 23).to(tl.float32, bitcast=True)
    r = (a + big) - big
    return tl.where(y < 0, -r, r)


@triton.jit
def _quantize_tiles(X, Q, S, R, K, stride_xr, stride_xk, stride_qr, stride_sr, stride_sk, amax_floor,
                    BLOCK_R: tl.constexpr, BLOCK: tl.constexpr, ROUND_IN_FP32: tl.constexpr):
    """Rows [BLOCK_R] x one K tile [BLOCK]: one scale per (row, tile)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kb = tl.program_id(1)
    cols = kb * BLOCK + tl.arange(0, BLOCK)
    mask_r = rows < R
    mask = mask_r[:, None] & (cols < K)[None, :]
    rows = rows.to(tl.int64)
    x = tl.load(X + rows[:, None] * stride_xr + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), axis=1), amax_floor) / 448.0
    y = tl.minimum(tl.maximum(x / s[:, None], -448.0), 448.0)
    if ROUND_IN_FP32:
        y = _round_to_e4m3(y)
    q = y.to(Q.dtype.element_ty, fp_downcast_rounding="rtne")  # exact when ROUND_IN_FP32
    tl.store(Q + rows[:, None] * stride_qr + cols[None, :], q, mask=mask)
    tl.store(S + rows * stride_sr + kb * stride_sk, s, mask=mask_r)


@triton.jit
def _quantize_blocks(W, Q, S, N, K, stride_wb, stride_wn, stride_wk, stride_qb, stride_qn, stride_sb, stride_sn,
                     amax_floor, BLOCK: tl.constexpr, ROUND_IN_FP32: tl.constexpr):
    """One block x block tile of matrix program_id(2): one scale."""
    nb, kb, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = nb * BLOCK + tl.arange(0, BLOCK)
    cols = kb * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    rows = rows.to(tl.int64)
    w = tl.load(W + b * stride_wb + rows[:, None] * stride_wn + cols[None, :] * stride_wk, mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.max(tl.abs(w), axis=1), axis=0), amax_floor) / 448.0
    y = tl.minimum(tl.maximum(w / s, -448.0), 448.0)
    if ROUND_IN_FP32:
        y = _round_to_e4m3(y)
    q = y.to(Q.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(Q + b * stride_qb + rows[:, None] * stride_qn + cols[None, :], q, mask=mask)
    tl.store(S + b * stride_sb + nb * stride_sn + kb, s)


def _quantize_launch(x2: torch.Tensor, block: int, mn_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [R, K], any strides (a transposed view quantises along its rows without a copy).
    mn_major: the scales [R, nk] are a view of [nk, R] storage, the layout the GEMMs read (fp8_matmul)."""
    R, K = x2.shape
    q = torch.empty(R, K, device=x2.device, dtype=FP8_DTYPE)
    nk = triton.cdiv(K, block)
    s = torch.empty(nk, R, device=x2.device, dtype=torch.float32).t() if mn_major else \
        torch.empty(R, nk, device=x2.device, dtype=torch.float32)
    if q.numel():
        block_r = 32 if x2.is_cuda else 64  # the interpreter pays per program
        grid = (triton.cdiv(R, block_r), triton.cdiv(K, block))
        _quantize_tiles[grid](x2, q, s, R, K, x2.stride(0), x2.stride(1), q.stride(0), *s.stride(), AMAX_FLOOR,
                              BLOCK_R=block_r, BLOCK=block, ROUND_IN_FP32=not x2.is_cuda)
    return q, s


def _quantize_weight_launch(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    N, K = w.shape[-2:]
    w3 = w.reshape(-1, N, K)
    q = torch.empty(w3.shape, device=w.device, dtype=FP8_DTYPE)
    s = torch.empty(w3.shape[0], triton.cdiv(N, block), triton.cdiv(K, block), device=w.device, dtype=torch.float32)
    if q.numel():
        _quantize_blocks[(s.shape[1], s.shape[2], s.shape[0])](
            w3, q, s, N, K, *w3.stride(), q.stride(0), q.stride(1), s.stride(0), s.stride(1), AMAX_FLOOR,
            BLOCK=block, ROUND_IN_FP32=not w.is_cuda, num_warps=8 if w.is_cuda else 4)
    return q.view(w.shape), s.view(*w.shape[:-2], *s.shape[1:])


# ---------------------------------------------------------------------------------------------
# entry points


def fp8_quantize(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x[..., K] -> (q float8_e4m3fn [..., K], scale float32 [..., ceil(K/block)]); x ≈ q * scale per
    1 x block tile (DeepSeek-V3's activation tiles). Triton or the torch reference (sputnik_kernels.dispatch)."""
    _check_block(block)
    if not x.is_floating_point() or x.dim() == 0:
        raise ValueError(f"fp8_quantize: x must be a floating tensor with a last dimension, got {x.dtype} {tuple(x.shape)}")
    if not _use_triton(x):
        return fp8_quantize_reference(x, block)
    q, s = _quantize_launch(x.reshape(-1, x.shape[-1]), block)
    return q.view(x.shape), s.view(*x.shape[:-1], s.shape[-1])


def fp8_quantize_weight(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w[..., N, K] -> (q [..., N, K], scale float32 [..., ceil(N/block), ceil(K/block)]), one scale per
    block x block tile of each matrix (DeepSeek-V3's weight blocks)."""
    _check_block(block)
    if not w.is_floating_point() or w.dim() < 2:
        raise ValueError(f"fp8_quantize_weight: w must be a floating [..., N, K] tensor, got {w.dtype} of shape {tuple(w.shape)}")
    if not _use_triton(w):
        return fp8_quantize_weight_reference(w, block)
    return _quantize_weight_launch(w, block)


def fp8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, block: int = 128) -> torch.Tensor:
    """a @ w.T -> [M, N] in out_dtype, fp32 accumulation with the block scales applied per K block.

    a_q [M, K] e4m3 with a_scale [M, ceil(K/block)] (1 x block tiles); w_q [N, K] e4m3 with w_scale
    either [ceil(N/block), ceil(K/block)] (block x block, a weight) or [N, ceil(K/block)] (1 x block
    rows, e.g. an activation transposed for wgrad).
    """
    _check_block(block)
    if a_q.dtype != FP8_DTYPE or w_q.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_gemm: operands must be {FP8_DTYPE} (use fp8_quantize), got {a_q.dtype} and {w_q.dtype}")
    if a_q.dim() != 2 or w_q.dim() != 2 or a_q.shape[1] != w_q.shape[1]:
        raise ValueError(f"fp8_gemm: need a [M, K] and w [N, K], got {tuple(a_q.shape)} and {tuple(w_q.shape)}")
    (M, _), N, nk = a_q.shape, w_q.shape[0], triton.cdiv(a_q.shape[1], block)
    if tuple(a_scale.shape) != (M, nk):
        raise ValueError(f"fp8_gemm: a_scale must be [{M}, {nk}] for block {block}, got {tuple(a_scale.shape)}")
    if tuple(w_scale.shape) not in ((triton.cdiv(N, block), nk), (N, nk)):
        raise ValueError(f"fp8_gemm: w_scale must be [{triton.cdiv(N, block)}, {nk}] (blocks) or [{N}, {nk}] (rows) "
                         f"for block {block}, got {tuple(w_scale.shape)}")
    if _use_triton(a_q):
        return gemm_launch(a_q, a_scale.float(), w_q, w_scale.float(), out_dtype, block)
    return fp8_gemm_reference(a_q, a_scale, w_q, w_scale, out_dtype, block)


def _quantize(x, block, triton_path):
    return _quantize_launch(x, block, mn_major=True) if triton_path else fp8_quantize_reference(x, block)


def _quantize_weight(w, block, triton_path):
    return _quantize_weight_launch(w, block) if triton_path else fp8_quantize_weight_reference(w, block)


def _gemm(a_q, a_s, w_q, w_s, out_dtype, block, triton_path):
    if triton_path:
        return gemm_launch(a_q, a_s, w_q, w_s, out_dtype, block)
    return fp8_gemm_reference(a_q, a_s, w_q, w_s, out_dtype, block)


class _FP8Linear(torch.autograd.Function):
    """y = x @ W^T with every GEMM on FP8 operands (see the module docstring for the tiles)."""

    @staticmethod
    def forward(ctx, x, weight, block, triton_path):
        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        w_q, w_s = _quantize_weight(weight, block, triton_path)
        x_q, x_s = _quantize(x2, block, triton_path)
        y = _gemm(x_q, x_s, w_q, w_s, x.dtype, block, triton_path)
        ctx.save_for_backward(x2, w_q, w_s)
        ctx.block, ctx.triton_path, ctx.x_shape, ctx.w_dtype = block, triton_path, x.shape, weight.dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w_q, w_s = ctx.saved_tensors
        block, tp = ctx.block, ctx.triton_path
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dx = dy @ W: dy tiles along N, W's blocks transposed
            dy_q, dy_s = _quantize(dy2, block, tp)
            dx = _gemm(dy_q, dy_s, w_q.t().contiguous(), w_s.t().contiguous(), x2.dtype, block, tp).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # dW = dy^T @ x: both tiled along the tokens
            dyt_q, dyt_s = _quantize(dy2.t(), block, tp)
            xt_q, xt_s = _quantize(x2.t(), block, tp)
            dw = _gemm(dyt_q, dyt_s, xt_q, xt_s, ctx.w_dtype, block, tp)
        return dx, dw, None, None


def _autocast(*ts):
    if torch.is_autocast_enabled(ts[0].device.type):
        dtype = torch.get_autocast_dtype(ts[0].device.type)
        return tuple(t.to(dtype) for t in ts)
    return ts


def _check_linear(x, weight, block):
    _check_block(block)
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: need x [..., K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, block: int = 128) -> torch.Tensor:
    """x @ weight.T with FP8 forward, input gradient and weight gradient; the weight stays in its
    own precision and its gradient comes back in it. Output (and dx) in x's dtype, or the autocast
    dtype under autocast. Triton or the torch emulation (sputnik_kernels.dispatch)."""
    _check_linear(x, weight, block)
    (x,) = _autocast(x)
    return _FP8Linear.apply(x, weight, block, _use_triton(x))


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, block: int = 128) -> torch.Tensor:
    """fp8_linear on the torch quantiser and GEMM (FP8 emulated through torch.float8_e4m3fn)."""
    _check_linear(x, weight, block)
    (x,) = _autocast(x)
    return _FP8Linear.apply(x, weight, block, False)


# ---------------------------------------------------------------------------------------------
# routed experts: FP8 grouped GEMM (Triton) and its emulation (torch)


class _FP8GroupedMMTriton(torch.autograd.Function):
    """out[rows of e] = x[rows of e] @ w[e] with every GEMM on e4m3 operands (tiles as in _FP8Linear:
    x per 1x128 along K, w per 128x128 block; dgrad: dy per 1x128 along N, w's blocks transposed;
    wgrad: x and dy per 128-token tiles)."""

    @staticmethod
    def forward(ctx, x_MK, w_EKN, offsets_E, block):
        w_q, w_s = _quantize_weight_launch(w_EKN, block)  # [E, K, N], scales [E, K/b, N/b]
        x_q, x_s = _quantize_launch(x_MK, block, mn_major=True)
        ctx.save_for_backward(x_MK, w_q, w_s, offsets_E)
        ctx.block, ctx.w_dtype = block, w_EKN.dtype
        return grouped_launch(x_q, x_s, w_q, w_s, offsets_E, x_MK.dtype, block)

    @staticmethod
    def backward(ctx, dy_MN):
        x, w_q, w_s, offsets = ctx.saved_tensors
        block = ctx.block
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dy_q, dy_s = _quantize_launch(dy_MN, block, mn_major=True)
            dx = grouped_launch(dy_q, dy_s, w_q.transpose(1, 2), w_s.transpose(1, 2), offsets, x.dtype, block)
        if ctx.needs_input_grad[1]:
            xt_q, xt_s = _quantize_launch(x.t(), block, mn_major=True)  # along the tokens
            dyt_q, dyt_s = _quantize_launch(dy_MN.t(), block, mn_major=True)
            dw = grouped_dw_launch(xt_q, xt_s, dyt_q, dyt_s, offsets, w_q.shape[0], ctx.w_dtype, block)
        return dx, dw, None, None


def _segment_wgrad(x_MK: torch.Tensor, dy_MN: torch.Tensor, offsets_E: torch.Tensor, E: int) -> torch.Tensor:
    """dw[e] = x[rows of e]^T @ dy[rows of e] -> [E, K, N] in fp32 (an expert with no rows gets 0)."""
    if E == 0:
        return x_MK.new_zeros(0, x_MK.shape[1], dy_MN.shape[1])
    ends = offsets_E.tolist()  # a host sync: acceptable for an emulation
    return torch.stack([x_MK[s:e].T @ dy_MN[s:e] for s, e in zip([0] + ends[:-1], ends)])


class _FP8GroupedMM(torch.autograd.Function):
    """The emulation: out[rows of e] = x[rows of e] @ w[e] on FP8-rounded operands (torch
    quantisers, dequantised, multiplied by the torch grouped GEMM); the tiles as in _FP8Linear."""

    @staticmethod
    def forward(ctx, x_MK, w_EKN, offsets_E, block):
        w_q, w_s = fp8_quantize_weight_reference(w_EKN, block)  # blocks of each [K, N] matrix
        w_deq = fp8_dequantize_weight(w_q, w_s, block).to(x_MK.dtype)
        x_deq = fp8_dequantize(*fp8_quantize_reference(x_MK, block), block).to(x_MK.dtype)
        ctx.save_for_backward(x_MK, w_deq, offsets_E)
        ctx.block, ctx.w_dtype = block, w_EKN.dtype
        return grouped_mm(x_deq, w_deq, offsets_E)

    @staticmethod
    def backward(ctx, dy_MN):
        x, w_deq, offsets = ctx.saved_tensors
        block = ctx.block
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dy tiles along N; w's blocks transposed
            dy_deq = fp8_dequantize(*fp8_quantize_reference(dy_MN, block), block).to(x.dtype)
            dx = grouped_mm(dy_deq, w_deq.transpose(1, 2), offsets)
        if ctx.needs_input_grad[1]:  # both tiled along the tokens; a tile may straddle two experts
            xt = fp8_dequantize(*fp8_quantize_reference(x.t(), block), block)
            dyt = fp8_dequantize(*fp8_quantize_reference(dy_MN.t(), block), block)
            dw = _segment_wgrad(xt.t(), dyt.t(), offsets, w_deq.shape[0]).to(ctx.w_dtype)
        return dx, dw, None, None


def fp8_grouped_mm(x_MK: torch.Tensor, w_EKN: torch.Tensor, offsets_E: torch.Tensor, block: int = 128) -> torch.Tensor:
    """sputnik_kernels.moe.grouped_mm with every GEMM (forward, dgrad, wgrad) on e4m3 operands: the
    Triton FP8 grouped GEMM (sputnik_kernels.dispatch; sm89+ on CUDA), else the torch emulation
    `fp8_grouped_mm_reference`. Rows of x sorted by expert, offsets[e] = end row of expert e.
    Differentiable in x and w; the output and dx in x's dtype (autocast's under autocast), dw in w's."""
    _check_block(block)
    if x_MK.dim() != 2 or w_EKN.dim() != 3 or x_MK.shape[1] != w_EKN.shape[1]:
        raise ValueError(f"fp8_grouped_mm: need x [M, K] and w [E, K, N], got {tuple(x_MK.shape)} and {tuple(w_EKN.shape)}")
    if offsets_E.shape != (w_EKN.shape[0],):
        raise ValueError(f"fp8_grouped_mm: offsets must have one end row per expert ({w_EKN.shape[0]}), got shape {tuple(offsets_E.shape)}")
    (x_MK,) = _autocast(x_MK)
    if _use_triton(x_MK):
        return _FP8GroupedMMTriton.apply(x_MK, w_EKN, offsets_E.to(device=x_MK.device, dtype=torch.int32), block)
    return _FP8GroupedMM.apply(x_MK, w_EKN, offsets_E, block)


def fp8_grouped_mm_reference(x_MK: torch.Tensor, w_EKN: torch.Tensor, offsets_E: torch.Tensor, block: int = 128) -> torch.Tensor:
    """fp8_grouped_mm emulated in torch (quantise with the torch references, dequantise, grouped GEMM
    in x's dtype): the reference the Triton FP8 grouped GEMM is tested against."""
    _check_block(block)
    (x_MK,) = _autocast(x_MK)
    return _FP8GroupedMM.apply(x_MK, w_EKN, offsets_E, block)
