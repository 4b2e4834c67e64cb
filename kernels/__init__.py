"""Triton kernels with pure-torch references. Landed: RMSNorm and SwiGLU. The MoE grouped GEMM,
FP8 block quantisation / GEMM and fused linear cross-entropy of issue #4 have not landed yet.

SPUTNIK_KERNELS=auto|triton|torch picks the implementation at each call (kernels/dispatch.py).
Test: `TRITON_INTERPRET=1 SPUTNIK_KERNELS=triton pytest tests/kernels/` (the tests set both).
"""

from kernels.rmsnorm import rmsnorm
from kernels.swiglu import swiglu

__all__ = ["rmsnorm", "swiglu"]
