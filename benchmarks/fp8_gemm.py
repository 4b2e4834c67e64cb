"""FP8 block-scaled GEMM (sputnik_kernels/fp8.py, Triton) vs torch's bf16 matmul, at 4096^3 and at
DeepSeek-V3 projection shapes with 4096 tokens: time, TFLOP/s, the ratio FP8 / bf16 (issue #4's
target: 1.2x or more at 4096^3), and the FP8 result's relative error against the bf16 product.
Quantisation is timed separately (activation 1x128 tiles, weight 128x128 blocks); the FP8 GEMM
figure excludes it, as in the issue. On a machine without a CUDA GPU it says so and exits 0.

A second table times the FP8 grouped GEMM of the routed experts (fp8_grouped_mm's kernel on
pre-quantised operands, and fp8_grouped_mm forward + backward with its quantisation) against the
bf16 grouped GEMM (sputnik_kernels.grouped_mm) on the same expert-sorted rows.

Run: `python benchmarks/fp8_gemm.py [--shapes 4096x4096x4096 ...]` (MxNxK: y[M,N] = x[M,K] @ w[N,K]^T).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

# (M tokens, N out, K in) — DeepSeek-V3 671B projections (REFERENCE.md) plus the square case.
SHAPES = {
    "square 4096^3": (4096, 4096, 4096),
    "wq_a+wkv_a (7168 -> 1536+576)": (4096, 2112, 7168),
    "wq_b (1536 -> 128x192)": (4096, 24576, 1536),
    "wkv_b (512 -> 128x256)": (4096, 32768, 512),
    "wo (128x128 -> 7168)": (4096, 7168, 16384),
    "expert w1|w3 (7168 -> 2x2048)": (4096, 4096, 7168),
    "expert w2 (2048 -> 7168)": (4096, 7168, 2048),
}


def bench(fn, iters: int = 30) -> float:
    """Median milliseconds per call (CUDA events)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", help="MxNxK shapes instead of the defaults")
    ap.add_argument("--sweep", action="store_true",
                    help="also time each kernel under several tile configurations at 4096^3 and at an expert shape")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/fp8_gemm.py: no CUDA GPU on this machine; the FP8 kernels are checked on CPU by "
              "`pytest tests/kernels/test_kernels_fp8.py` (Triton interpreter) instead. Nothing to measure.")
        return 0
    os.environ["SPUTNIK_KERNELS"] = "triton"
    from sputnik_kernels.fp8 import fp8_gemm, fp8_quantize, fp8_quantize_weight

    shapes = {s: tuple(int(v) for v in s.split("x")) for s in args.shapes} if args.shapes else SHAPES
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        print(f"benchmarks/fp8_gemm.py: {torch.cuda.get_device_name()} is sm{cap[0]}{cap[1]}; Triton's e4m3 needs sm89+ "
              "(Ada, Hopper), and sputnik_kernels/fp8.py falls back to the torch emulation there. Nothing to measure.")
        return 0
    print(f"device {torch.cuda.get_device_name()} (sm{cap[0]}{cap[1]}), torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'shape':32s} {'MxNxK':>18s} {'bf16 ms':>8s} {'TFLOP/s':>8s} {'fp8 ms':>8s} {'TFLOP/s':>8s} "
          f"{'fp8/bf16':>8s} {'quant ms':>9s} {'rel err':>8s}")
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (M, N, K) in shapes.items():
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
        w = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).to(torch.bfloat16)
        xq, xs = fp8_quantize(x)
        wq, ws = fp8_quantize_weight(w)
        flops = 2 * M * N * K
        bf16_ms = bench(lambda: x @ w.T)
        fp8_ms = bench(lambda: fp8_gemm(xq, xs, wq, ws, torch.bfloat16))
        quant_ms = bench(lambda: fp8_quantize(x)) + bench(lambda: fp8_quantize_weight(w))
        ref = (x @ w.T).float()
        err = ((fp8_gemm(xq, xs, wq, ws, torch.bfloat16).float() - ref).norm() / ref.norm()).item()
        print(f"{name:32s} {f'{M}x{N}x{K}':>18s} {bf16_ms:8.3f} {flops / bf16_ms / 1e9:8.0f} {fp8_ms:8.3f} "
              f"{flops / fp8_ms / 1e9:8.0f} {bf16_ms / fp8_ms:7.2f}x {quant_ms:9.3f} {err:8.4f}")
    grouped(g)
    if args.sweep:
        sweep(g)
    return 0


SWEEP = [  # (BLOCK_M, BLOCK_N, num_stages, num_warps); BLOCK_K is the quantisation block (128)
    (128, 128, 3, 8), (128, 128, 4, 8), (128, 128, 5, 4), (128, 256, 3, 8), (128, 256, 4, 8),
    (256, 128, 3, 8), (64, 128, 4, 4), (64, 256, 4, 8), (128, 64, 4, 4),
]


def sweep(g: torch.Generator) -> None:
    """Tile configurations of the FP8 GEMM (4096^3) and of the FP8 grouped GEMM (16 experts,
    16,384 rows, 7168 -> 2048), TFLOP/s each, the current defaults marked; to pick better defaults."""
    from sputnik_kernels.fp8 import (_fp8_grouped_launch, _gemm_config, _gemm_launch, _grouped_config, fp8_quantize,
                                     fp8_quantize_weight)

    M = N = K = 4096
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    w = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).to(torch.bfloat16)
    xq, xs = fp8_quantize(x)
    wq, ws = fp8_quantize_weight(w)
    rows, E, Kg, Ng = 16384, 16, 7168, 2048
    xg = torch.randn(rows, Kg, device="cuda", dtype=torch.bfloat16, generator=g)
    wg = (torch.randn(E, Kg, Ng, device="cuda", generator=g) / Kg**0.5).to(torch.bfloat16)
    xgq, xgs = fp8_quantize(xg)
    wgq, wgs = fp8_quantize_weight(wg)
    offsets = torch.linspace(rows / E, rows, E, device="cuda").round().to(torch.int32)
    dense_default, grouped_default = _gemm_config(xq, M), _grouped_config(xgq)
    print("\ntile sweep (TFLOP/s; * = current default)")
    print(f"{'BLOCK_M x BLOCK_N, stages, warps':34s} {'fp8_gemm 4096^3':>16s} {'grouped 7168->2048':>19s}")
    for bm, bn, stages, warps in SWEEP:
        cfg = dict(FP8_DOT=True, BLOCK_M=bm, BLOCK_N=bn, num_stages=stages, num_warps=warps)
        out = []
        for fn, flops, default in (
                (lambda: _gemm_launch(xq, xs, wq, ws, torch.bfloat16, 128, dict(cfg, GROUP_M=8)), 2 * M * N * K, dense_default),
                (lambda: _fp8_grouped_launch(xgq, xgs, wgq, wgs, offsets, torch.bfloat16, 128, cfg), 2 * rows * Kg * Ng, grouped_default)):
            mark = "*" if all(default.get(k) == v for k, v in cfg.items()) else " "
            try:
                out.append(f"{flops / bench(fn, iters=10) / 1e9:.0f}{mark}")
            except Exception as e:  # e.g. triton's OutOfResources for a tile too large for shared memory
                out.append(type(e).__name__[:15])
        print(f"{f'{bm} x {bn}, {stages}, {warps}':34s} {out[0]:>16s} {out[1]:>19s}")


EXPERT_SHAPES = {"w1 or w3 (7168 -> 2048)": (7168, 2048), "w2 (2048 -> 7168)": (2048, 7168)}


def grouped(g: torch.Generator, experts: int = 16, rows: int = 16384, shapes=EXPERT_SHAPES, device: str = "cuda") -> None:
    """Routed experts: `rows` expert-sorted rows over `experts` experts with uneven counts."""
    from sputnik_kernels.fp8 import _fp8_grouped_launch, fp8_grouped_mm, fp8_quantize, fp8_quantize_weight
    from sputnik_kernels.moe import grouped_mm

    counts = torch.distributions.Dirichlet(torch.full((experts,), 4.0)).sample() * rows
    counts = counts.floor().long()
    counts[-1] += rows - counts.sum()
    offsets = counts.cumsum(0).to(torch.int32).to(device)
    print(f"\nrouted experts: {rows} rows over {experts} experts (counts {counts.min().item()}..{counts.max().item()})")
    print(f"{'expert GEMM':24s} {'KxN':>11s} {'bf16 ms':>8s} {'TFLOP/s':>8s} {'fp8 ms':>8s} {'TFLOP/s':>8s} {'fp8/bf16':>8s} "
          f"{'f+b bf16':>9s} {'f+b fp8':>8s} {'ratio':>6s}")
    for name, (K, N) in shapes.items():
        x = torch.randn(rows, K, device=device, dtype=torch.bfloat16, generator=g)
        w = (torch.randn(experts, K, N, device=device, generator=g) / K**0.5).to(torch.bfloat16)
        xq, xs = fp8_quantize(x)
        wq, ws = fp8_quantize_weight(w)
        flops = 2 * rows * K * N
        bf16_ms = bench(lambda: grouped_mm(x, w, offsets))
        fp8_ms = bench(lambda: _fp8_grouped_launch(xq, xs, wq, ws, offsets, torch.bfloat16, 128))
        xg, wg, w32 = x.clone().requires_grad_(True), w.clone().requires_grad_(True), w.float().requires_grad_(True)
        dy = torch.randn(rows, N, device=device, dtype=torch.bfloat16, generator=g)
        fb_bf16 = bench(lambda: grouped_mm(xg, wg, offsets).backward(dy), iters=10)
        fb_fp8 = bench(lambda: fp8_grouped_mm(xg, w32, offsets).backward(dy), iters=10)
        print(f"{name:24s} {f'{K}x{N}':>11s} {bf16_ms:8.3f} {flops / bf16_ms / 1e9:8.0f} {fp8_ms:8.3f} {flops / fp8_ms / 1e9:8.0f} "
              f"{bf16_ms / fp8_ms:7.2f}x {fb_bf16:9.3f} {fb_fp8:8.3f} {fb_bf16 / fb_fp8:5.2f}x")


if __name__ == "__main__":
    sys.exit(main())
