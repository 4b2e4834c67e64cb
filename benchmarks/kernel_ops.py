"""Kernel benchmarks on a CUDA GPU: per kernel, time, achieved TB/s and percent of the device's
measured copy bandwidth (a large device-to-device copy timed in the same run), against torch eager
and torch.compile on the same inputs. Landed kernels: RMSNorm and SwiGLU (forward and backward).
On a machine without a GPU it says so and exits 0.

Run: `python benchmarks/kernel_ops.py [--tokens 32768] [--dim 7168]`.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def bench(fn, iters: int = 50) -> float:
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


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), 20)
    return 2 * x.numel() / (ms * 1e-3)  # read + write bytes per second


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--dim", type=int, default=7168)
    ap.add_argument("--inter", type=int, default=2048 * 8)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernel_ops.py: no CUDA GPU on this machine; the Triton kernels are checked on CPU by "
              "`TRITON_INTERPRET=1 pytest tests/kernels` instead. Nothing to measure.")
        return 0
    os.environ["SPUTNIK_KERNELS"] = "triton"
    from sputnik_kernels.rmsnorm import rmsnorm, rmsnorm_reference
    from sputnik_kernels.swiglu import swiglu, swiglu_reference

    dev, dt = "cuda", torch.bfloat16
    peak = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}; measured copy bandwidth {peak / 1e12:.2f} TB/s")
    x = torch.randn(a.tokens, a.dim, device=dev, dtype=dt, requires_grad=True)
    w = torch.ones(a.dim, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(a.tokens, a.inter // 8, device=dev, dtype=dt, requires_grad=True)
    u = torch.randn_like(g, requires_grad=True)
    compiled_rms = torch.compile(rmsnorm_reference)
    compiled_swiglu = torch.compile(swiglu_reference)
    cases = [
        ("rmsnorm fwd", x.numel() * 2 * 2, {"eager": lambda: rmsnorm_reference(x, w), "triton": lambda: rmsnorm(x, w), "compile": lambda: compiled_rms(x, w)}),
        ("swiglu fwd", g.numel() * 2 * 3, {"eager": lambda: swiglu_reference(g, u), "triton": lambda: swiglu(g, u), "compile": lambda: compiled_swiglu(g, u)}),
    ]
    dy_x, dy_g = torch.randn_like(x), torch.randn_like(g)

    def fwd_bwd(f, inp, dy):
        def run():
            out = f()
            torch.autograd.grad(out, inp, dy)
        return run

    cases += [
        ("rmsnorm fwd+bwd", x.numel() * 2 * 5, {k: fwd_bwd(v, (x, w), dy_x) for k, v in cases[0][2].items()}),
        ("swiglu fwd+bwd", g.numel() * 2 * 8, {k: fwd_bwd(v, (g, u), dy_g) for k, v in cases[1][2].items()}),
    ]
    print(f"{'kernel':18s} {'impl':8s} {'ms':>8s} {'TB/s':>7s} {'% copy':>7s} {'vs eager':>9s}")
    for name, nbytes, impls in cases:
        eager_ms = None
        for impl, fn in impls.items():
            ms = bench(fn)
            eager_ms = ms if impl == "eager" else eager_ms
            tbs = nbytes / (ms * 1e-3)
            rel = f"{eager_ms / ms:8.2f}x" if eager_ms else ""
            print(f"{name:18s} {impl:8s} {ms:8.3f} {tbs / 1e12:7.2f} {tbs / peak:7.1%} {rel:>9s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
