"""Triton kernels with pure-torch references: RMSNorm and SwiGLU, the MoE routing metadata /
permute / unpermute / grouped GEMM (sputnik_kernels/moe.py), FP8 e4m3 block quantisation, block-scaled
GEMM, the FP8 linear and FP8 grouped GEMM (sputnik_kernels/fp8.py), and the fused linear cross-entropy / log-probs
(chunks of tokens; each chunk's rows by a Triton kernel, sputnik_kernels/cross_entropy.py), and the
absorbed MLA decode attention over the latent cache (sputnik_kernels/mla_decode.py).

SPUTNIK_KERNELS=auto|triton|torch picks the implementation at each call (sputnik_kernels/dispatch.py).
Test: `TRITON_INTERPRET=1 SPUTNIK_KERNELS=triton pytest tests/kernels/` (the tests set both).
"""

from sputnik_kernels.cross_entropy import fused_linear_cross_entropy, fused_linear_logprobs
from sputnik_kernels.fp8 import fp8_gemm, fp8_linear, fp8_quantize, fp8_quantize_weight
from sputnik_kernels.mla_decode import mla_decode
from sputnik_kernels.moe import grouped_mm, permute, routing_metadata, unpermute
from sputnik_kernels.rmsnorm import rmsnorm
from sputnik_kernels.swiglu import swiglu

__all__ = [
    "fp8_gemm", "fp8_linear", "fp8_quantize", "fp8_quantize_weight", "fused_linear_cross_entropy", "fused_linear_logprobs",
    "grouped_mm", "mla_decode", "permute", "rmsnorm", "routing_metadata", "swiglu", "unpermute",
]
