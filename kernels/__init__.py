"""Triton kernels with pure-torch references. Landed: RMSNorm and SwiGLU (Triton), and the fused
linear cross-entropy / log-probs as chunked torch code. The MoE grouped GEMM, FP8 block
quantisation / GEMM and a Triton cross-entropy of issue #4 have not landed yet.

SPUTNIK_KERNELS=auto|triton|torch picks the implementation at each call (kernels/dispatch.py).
Test: `TRITON_INTERPRET=1 SPUTNIK_KERNELS=triton pytest tests/kernels/` (the tests set both).
"""

from kernels.cross_entropy import fused_linear_cross_entropy, fused_linear_logprobs
from kernels.rmsnorm import rmsnorm
from kernels.swiglu import swiglu

__all__ = ["fused_linear_cross_entropy", "fused_linear_logprobs", "rmsnorm", "swiglu"]
