"""FP8 block-scaled GEMM (sputnik_kernels/fp8_matmul.py's persistent Triton kernels) vs torch's bf16
matmul, at 4096^3 and at DeepSeek-V3 projection shapes with 4096 tokens: time, TFLOP/s, the ratio
FP8 / bf16 (issue 24's target: 1.3x or more), for the default path (TMA on sm90+) and the pointer-load
path, and the FP8 result's relative error against the bf16 product. Quantisation is timed
separately (activation 1x128 tiles, weight 128x128 blocks); the FP8 GEMM figure excludes it.

A second table times the FP8 grouped GEMM of the routed experts (fp8_grouped_mm's kernel on
pre-quantised operands; the same on a K-major copy of the weight; dgrad's GEMM; and fp8_grouped_mm
forward + backward with its quantisation) against the bf16 grouped GEMM (sputnik_kernels.grouped_mm)
on the same expert-sorted rows (target: 1.2x).
`--sweep` times the kernels under the tile configurations in SWEEP (bf16 measured in the same run).

Without a GPU: `--compile-only` compiles the default and SWEEP configurations for sm90 (Triton's
own ptxas, no device needed) and prints registers, spilled stack bytes, shared memory and whether
the K loop is fed by TMA or cp.async (software pipelined) -- a check that the Hopper path builds
and fits, not a timing. Without a GPU and without --compile-only it says so and exits 0.

Run: `python benchmarks/fp8_gemm.py [--shapes 4096x4096x4096 ...] [--sweep] [--compile-only]`
(MxNxK: y[M,N] = x[M,K] @ w[N,K]^T).
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
SWEEP = [  # (BLOCK_M, BLOCK_N, num_stages, num_warps, USE_TMA); BLOCK_K is the quantisation block (128)
    (128, 128, 3, 8, True), (128, 128, 4, 8, True), (128, 128, 5, 8, True), (128, 128, 4, 8, False),
    (64, 256, 4, 8, True), (128, 64, 4, 4, True), (64, 128, 4, 4, True), (64, 128, 6, 4, True),
    (128, 256, 3, 8, True), (256, 128, 3, 16, True),
]
EXPERTS, EXPERT_ROWS, EXPERT_K, EXPERT_N = 16, 16384, 7168, 2048  # the sweep's grouped case


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


def sweep_cfg(bm: int, bn: int, stages: int, warps: int, tma: bool, num_sms: int) -> dict:
    return dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, NUM_SMS=num_sms, USE_TMA=tma, FP8_DOT=True, num_stages=stages,
                num_warps=warps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", help="MxNxK shapes instead of the defaults")
    ap.add_argument("--sweep", action="store_true",
                    help="also time each kernel under the SWEEP tile configurations at 4096^3 and at an expert shape")
    ap.add_argument("--compile-only", action="store_true",
                    help="no GPU needed: compile the default and SWEEP configurations for sm90 and print their resources")
    args = ap.parse_args()
    if args.compile_only:
        return compile_only()
    if not torch.cuda.is_available():
        print("benchmarks/fp8_gemm.py: no CUDA GPU on this machine; the FP8 kernels are checked on CPU by "
              "`pytest tests/kernels/test_kernels_fp8.py` (Triton interpreter), and `--compile-only` builds them "
              "for sm90 here. Nothing to measure.")
        return 0
    os.environ["SPUTNIK_KERNELS"] = "triton"
    from sputnik_kernels.fp8 import fp8_gemm, fp8_quantize, fp8_quantize_weight
    from sputnik_kernels.fp8_matmul import gemm_config, gemm_launch

    shapes = {s: tuple(int(v) for v in s.split("x")) for s in args.shapes} if args.shapes else SHAPES
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        print(f"benchmarks/fp8_gemm.py: {torch.cuda.get_device_name()} is sm{cap[0]}{cap[1]}; Triton's e4m3 needs sm89+ "
              "(Ada, Hopper), and sputnik_kernels/fp8.py falls back to the torch emulation there. Nothing to measure.")
        return 0
    print(f"device {torch.cuda.get_device_name()} (sm{cap[0]}{cap[1]}), torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'shape':32s} {'MxNxK':>18s} {'bf16 ms':>8s} {'TFLOP/s':>8s} {'fp8 ms':>8s} {'TFLOP/s':>8s} "
          f"{'fp8/bf16':>8s} {'no-TMA':>7s} {'quant ms':>9s} {'rel err':>8s}")
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (M, N, K) in shapes.items():
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
        w = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).to(torch.bfloat16)
        xq, xs = fp8_quantize(x)
        wq, ws = fp8_quantize_weight(w)
        flops = 2 * M * N * K
        bf16_ms = bench(lambda: x @ w.T)
        fp8_ms = bench(lambda: fp8_gemm(xq, xs, wq, ws, torch.bfloat16))
        no_tma = dict(gemm_config(xq, M, N, K), USE_TMA=False)
        ptr_ms = bench(lambda: gemm_launch(xq, xs, wq, ws, torch.bfloat16, 128, no_tma))
        quant_ms = bench(lambda: fp8_quantize(x)) + bench(lambda: fp8_quantize_weight(w))
        ref = (x @ w.T).float()
        err = ((fp8_gemm(xq, xs, wq, ws, torch.bfloat16).float() - ref).norm() / ref.norm()).item()
        print(f"{name:32s} {f'{M}x{N}x{K}':>18s} {bf16_ms:8.3f} {flops / bf16_ms / 1e9:8.0f} {fp8_ms:8.3f} "
              f"{flops / fp8_ms / 1e9:8.0f} {bf16_ms / fp8_ms:7.2f}x {bf16_ms / ptr_ms:6.2f}x {quant_ms:9.3f} {err:8.4f}")
    grouped(g)
    if args.sweep:
        sweep(g)
    return 0


def sweep(g: torch.Generator) -> None:
    """SWEEP's tile configurations of the FP8 GEMM (4096^3) and of the FP8 grouped GEMM (EXPERTS
    experts, EXPERT_ROWS rows, EXPERT_K -> EXPERT_N), TFLOP/s each, the defaults marked, bf16 alongside."""
    from sputnik_kernels.fp8 import fp8_quantize, fp8_quantize_weight
    from sputnik_kernels.fp8_matmul import gemm_config, gemm_launch, grouped_config, grouped_launch
    from sputnik_kernels.moe import grouped_mm

    M = N = K = 4096
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    w = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).to(torch.bfloat16)
    xq, xs = fp8_quantize(x)
    wq, ws = fp8_quantize_weight(w)
    rows, E, Kg, Ng = EXPERT_ROWS, EXPERTS, EXPERT_K, EXPERT_N
    xg = torch.randn(rows, Kg, device="cuda", dtype=torch.bfloat16, generator=g)
    wg = (torch.randn(E, Kg, Ng, device="cuda", generator=g) / Kg**0.5).to(torch.bfloat16)
    xgq, xgs = fp8_quantize(xg)
    wgq, wgs = fp8_quantize_weight(wg)
    offsets = torch.linspace(rows / E, rows, E, device="cuda").round().to(torch.int32)
    dense_flops, grouped_flops = 2 * M * N * K, 2 * rows * Kg * Ng
    dense_default, grouped_default = gemm_config(xq, M, N, K), grouped_config(xgq)
    print("\ntile sweep (TFLOP/s; * = current default)")
    print(f"{'BLOCK_M x BLOCK_N, stages, warps, TMA':40s} {'fp8_gemm 4096^3':>16s} {'grouped 7168->2048':>19s}")
    print(f"{'torch bf16 (matmul, grouped_mm)':40s} {dense_flops / bench(lambda: x @ w.T) / 1e9:16.0f} "
          f"{grouped_flops / bench(lambda: grouped_mm(xg, wg, offsets)) / 1e9:19.0f}")
    for bm, bn, stages, warps, tma in SWEEP:
        cfg = sweep_cfg(bm, bn, stages, warps, tma, dense_default["NUM_SMS"])
        out = []
        for fn, flops, default in (
                (lambda: gemm_launch(xq, xs, wq, ws, torch.bfloat16, 128, cfg), dense_flops, dense_default),
                (lambda: grouped_launch(xgq, xgs, wgq, wgs, offsets, torch.bfloat16, 128, cfg), grouped_flops, grouped_default)):
            mark = "*" if all(default.get(k) == v for k, v in cfg.items()) else " "
            try:
                out.append(f"{flops / bench(fn, iters=10) / 1e9:.0f}{mark}")
            except Exception as e:  # e.g. triton's OutOfResources for a tile too large for shared memory
                out.append(type(e).__name__[:15])
        print(f"{f'{bm} x {bn}, {stages}, {warps}, {tma}':40s} {out[0]:>16s} {out[1]:>19s}")


def compile_only() -> int:
    """Compile the kernels for sm90 (no device) under the default and SWEEP configurations."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("benchmarks/fp8_gemm.py --compile-only: unset TRITON_INTERPRET (the interpreter compiles nothing)")
        return 1
    from sputnik_kernels.fp8_matmul import _fp8_gemm_persistent, _fp8_grouped_persistent, gemm_args, grouped_args

    fp8 = torch.float8_e4m3fn
    M = N = K = 4096
    dense = (torch.empty(M, K, dtype=fp8), torch.empty(K // 128, M).t(), torch.empty(N, K, dtype=fp8),
             torch.empty(N // 128, K // 128), torch.empty(M, N, dtype=torch.bfloat16))
    rows, E, Kg, Ng = EXPERT_ROWS, EXPERTS, EXPERT_K, EXPERT_N
    a, a_s = torch.empty(rows, Kg, dtype=fp8), torch.empty(Kg // 128, rows).t()
    w_fwd = (torch.empty(E, Kg, Ng, dtype=fp8), torch.empty(E, Kg // 128, Ng // 128))  # N contiguous
    w_dgrad = (torch.empty(E, Ng, Kg, dtype=fp8).transpose(1, 2), torch.empty(E, Ng // 128, Kg // 128).transpose(1, 2))
    cases = [(f"{bm} x {bn}, {st}, {wp}, {'TMA' if tma else 'pointers'}", sweep_cfg(bm, bn, st, wp, tma, 132))
             for bm, bn, st, wp, tma in SWEEP]
    print(f"sm90, triton {triton.__version__}: registers/thread, spilled stack bytes, shared KiB, K-loop loads")
    print(f"{'config':32s} {'fp8_gemm 4096^3':>28s} {'grouped fwd (N-major w)':>28s} {'grouped dgrad (K-major w)':>28s}")
    for name, cfg in cases:
        cols = []
        for kernel, (grid, args, kwargs) in (
                (_fp8_gemm_persistent, gemm_args(*dense[:4], dense[4], 128, cfg)),
                (_fp8_grouped_persistent, grouped_args(a, a_s, *w_fwd, torch.zeros(E, dtype=torch.int32), dense[4], 128, cfg)),
                (_fp8_grouped_persistent, grouped_args(a, a_s, *w_dgrad, torch.zeros(E, dtype=torch.int32), dense[4], 128, cfg))):
            try:
                cols.append(_resources(_compile_sm90(kernel, args, kwargs)))
            except Exception as e:  # a configuration that does not fit (shared memory) or a Triton without sm90
                cols.append(f"{type(e).__name__}"[:28])
        print(f"{name:32s} {cols[0]:>28s} {cols[1]:>28s} {cols[2]:>28s}")
    return 0


def _compile_sm90(kernel, args, kwargs):
    """What kernel[grid](*args, **kwargs) would compile on an sm90 device (Triton's launch-time binder)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    bound, specialization, options = create_function_from_signature(kernel.signature, kernel.params, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def _resources(k) -> str:
    """'REG/STACK/shared KiB/loads' from a compiled kernel: its cubin's resource usage and its TTGIR."""
    import subprocess
    import tempfile
    from pathlib import Path

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(line for line in usage.splitlines() if "REG:" in line)
    fields = dict(kv.split(":", 1) for kv in line.split() if ":" in kv)
    ttgir = k.asm["ttgir"]
    loads = "TMA" if "async_tma_copy_global_to_local" in ttgir else "cp.async" if "async_copy_global_to_local" in ttgir else "sync"
    return f"{fields['REG']}/{fields['STACK']}/{k.metadata.shared // 1024}/{loads}"


EXPERT_SHAPES = {"w1 or w3 (7168 -> 2048)": (7168, 2048), "w2 (2048 -> 7168)": (2048, 7168)}


def grouped(g: torch.Generator, experts: int = 16, rows: int = 16384, shapes=EXPERT_SHAPES, device: str = "cuda") -> None:
    """Routed experts: `rows` expert-sorted rows over `experts` experts with uneven counts."""
    from sputnik_kernels.fp8 import fp8_grouped_mm, fp8_quantize, fp8_quantize_weight
    from sputnik_kernels.fp8_matmul import grouped_launch
    from sputnik_kernels.moe import grouped_mm

    counts = torch.distributions.Dirichlet(torch.full((experts,), 4.0)).sample() * rows
    counts = counts.floor().long()
    counts[-1] += rows - counts.sum()
    offsets = counts.cumsum(0).to(torch.int32).to(device)
    print(f"\nrouted experts: {rows} rows over {experts} experts (counts {counts.min().item()}..{counts.max().item()})")
    print(f"{'expert GEMM':24s} {'KxN':>11s} {'bf16 ms':>8s} {'TFLOP/s':>8s} {'fp8 ms':>8s} {'TFLOP/s':>8s} {'fp8/bf16':>8s} "
          f"{'K-major':>7s} {'dgrad':>6s} {'f+b bf16':>9s} {'f+b fp8':>8s} {'ratio':>6s}")
    for name, (K, N) in shapes.items():
        x = torch.randn(rows, K, device=device, dtype=torch.bfloat16, generator=g)
        w = (torch.randn(experts, K, N, device=device, generator=g) / K**0.5).to(torch.bfloat16)
        xq, xs = fp8_quantize(x)
        wq, ws = fp8_quantize_weight(w)
        flops = 2 * rows * K * N
        bf16_ms = bench(lambda: grouped_mm(x, w, offsets))
        fp8_ms = bench(lambda: grouped_launch(xq, xs, wq, ws, offsets, torch.bfloat16, 128))
        # the forward on a K-major copy of the weight ([E, N, K] storage): what Triton's on-chip
        # transpose of the N-major [E, K, N] tiles costs (FP8 wgmma reads K-major operands only)
        wq_k = wq.transpose(1, 2).contiguous().transpose(1, 2)
        k_major = bf16_ms / bench(lambda: grouped_launch(xq, xs, wq_k, ws, offsets, torch.bfloat16, 128))
        # dgrad's GEMM: dy [rows, N] @ w[e]^T, the weight read K-major (as a transposed view)
        dyq, dys = fp8_quantize(torch.randn(rows, N, device=device, dtype=torch.bfloat16, generator=g))
        dgrad = bench(lambda: grouped_mm(x[:, :N].contiguous(), w.transpose(1, 2), offsets)) / bench(
            lambda: grouped_launch(dyq, dys, wq.transpose(1, 2), ws.transpose(1, 2), offsets, torch.bfloat16, 128))
        xg, wg, w32 = x.clone().requires_grad_(True), w.clone().requires_grad_(True), w.float().requires_grad_(True)
        dy = torch.randn(rows, N, device=device, dtype=torch.bfloat16, generator=g)
        fb_bf16 = bench(lambda: grouped_mm(xg, wg, offsets).backward(dy), iters=10)
        fb_fp8 = bench(lambda: fp8_grouped_mm(xg, w32, offsets).backward(dy), iters=10)
        print(f"{name:24s} {f'{K}x{N}':>11s} {bf16_ms:8.3f} {flops / bf16_ms / 1e9:8.0f} {fp8_ms:8.3f} {flops / fp8_ms / 1e9:8.0f} "
              f"{bf16_ms / fp8_ms:7.2f}x {k_major:6.2f}x {dgrad:5.2f}x {fb_bf16:9.3f} {fb_fp8:8.3f} {fb_bf16 / fb_fp8:5.2f}x")


if __name__ == "__main__":
    sys.exit(main())
