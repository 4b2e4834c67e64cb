"""All kernel benchmarks of sputnik_kernels/ in one command, for a lent GPU: each script measures its
own baseline in the same run and prints ratios (see its docstring), and this runs them in turn
with the issue's targets above each, so one device session records everything:

  kernel_ops.py     RMSNorm, SwiGLU fwd / fwd+bwd: TB/s, % of measured copy bandwidth, vs eager
                    and torch.compile                          target: >= 80% of copy bandwidth
  moe_dispatch.py   routed-expert MLP (permute, grouped GEMM, unpermute) vs a per-expert loop
                                                               target: >= 3x the loop
  fp8_gemm.py       FP8 block-scaled GEMM vs torch bf16 matmul  target: >= 1.2x at 4096^3
  cross_entropy.py  fused linear cross-entropy vs the materialised head at vocab 129,280
                                                               target: <= 1/4 the memory, <= 1.1x the time
  mla_decode.py     absorbed MLA decode attention vs the torch path at DeepSeek-V3 shapes (128 heads,
                    C 512, R 64; 64-128 rows, 1K-4K slots)     target: >= 70% of copy bandwidth

Run: `python benchmarks/kernel_suite.py [--only NAME ...]`. Without a CUDA GPU it says so and exits 0:
the kernels are then checked by `pytest tests/kernels` (part of the default test run, Triton interpreted on CPU).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SCRIPTS = {
    "kernel_ops": ("RMSNorm and SwiGLU", "80% or more of the measured copy bandwidth"),
    "moe_dispatch": ("MoE permute / grouped GEMM / unpermute", "3x or more a per-expert loop; grouped GEMM 60% of bf16 matmul"),
    "fp8_gemm": ("FP8 block-scaled GEMM", "1.2x or more torch's bf16 matmul at 4096^3 (quantisation timed apart)"),
    "cross_entropy": ("fused linear cross-entropy", "a quarter or less of the naive peak memory, at most 1.1x its time"),
    "mla_decode": ("absorbed MLA decode attention", "70% or more of the measured copy bandwidth reading the latent cache"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", choices=list(SCRIPTS), help="run these scripts only")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernel_suite.py: no CUDA GPU on this machine, nothing to measure; the Triton kernels are "
              "checked against their torch references by `pytest tests/kernels` (Triton interpreted on CPU) instead.")
        return 0
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    failed = []
    for name in a.only or SCRIPTS:
        what, target = SCRIPTS[name]
        print(f"\n== {name}.py: {what} (target: {target})", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, str(HERE / f"{name}.py")], cwd=HERE.parent).returncode
        print(f"== {name}.py: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"benchmarks/kernel_suite.py: {', '.join(failed)} failed (see above)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
