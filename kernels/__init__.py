"""Triton kernels with pure-torch references: RMSNorm and SwiGLU, the MoE routing metadata /
permute / unpermute / grouped GEMM (kernels/moe.py), FP8 e4m3 block quantisation, block-scaled
GEMM and the FP8 linear (kernels/fp8.py), and the fused linear cross-entropy / log-probs (chunked
torch code; a Triton version of it has not landed).

SPUTNIK_KERNELS=auto|triton|torch picks the implementation at each call (kernels/dispatch.py).
Test: `TRITON_INTERPRET=1 SPUTNIK_KERNELS=triton pytest tests/kernels/` (the tests set both).
"""

from kernels.cross_entropy import fused_linear_cross_entropy, fused_linear_logprobs
from kernels.fp8 import fp8_gemm, fp8_linear, fp8_quantize, fp8_quantize_weight
from kernels.moe import grouped_mm, permute, routing_metadata, unpermute
from kernels.rmsnorm import rmsnorm
from kernels.swiglu import swiglu

__all__ = [
    "fp8_gemm", "fp8_linear", "fp8_quantize", "fp8_quantize_weight", "fused_linear_cross_entropy", "fused_linear_logprobs",
    "grouped_mm", "permute", "rmsnorm", "routing_metadata", "swiglu", "unpermute",
]
