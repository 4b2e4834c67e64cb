"""FP8 training for a built model (DeepSeek-V3 section 3.3): its linear layers compute through
sputnik_kernels.fp8_linear — e4m3 operands with 1x128 activation tiles and 128x128 weight blocks in the
forward, dgrad and wgrad — while the parameters (the master weights) keep their dtype.

Converted, as in DeepSeek-V3: the MLA projections (wq / wq_a / wq_b, wkv_a, wkv_b, wo), the dense
and shared-expert MLPs, the MTP projection eh_proj, and the routed experts' stacked w1/w3/w2
(through sputnik_kernels.fp8.fp8_grouped_mm: a Triton FP8 grouped GEMM on CUDA, emulated on
CPU). On MoE's few-token CPU path the routed experts run sorted all the same (FP8Experts.forward).
Left in high precision, as in the paper: the embedding, the output head (OutputHead, an nn.Linear
subclass, so it is never matched), the router gate, norms and attention itself. MLA's absorbed
inference path reads wkv_b.weight directly and stays in high precision.

The conversion switches the class of each converted module (to FP8Linear / FP8Experts, subclasses
that add no state — torch.nn.utils.parametrize swaps classes the same way), so parameters,
state-dict keys, hooks and optimizer state are untouched, and `remove_fp8` switches them back.
On CPU the torch reference emulates FP8 (quantise to float8_e4m3fn, dequantise, fp32 GEMM); on
CUDA the Triton kernels run (sputnik_kernels.dispatch).

Test: `pytest tests/model/test_model_fp8.py` (the 200-step loss comparison is marked slow).
"""

from __future__ import annotations

import torch
from torch import nn

from sputnik_kernels import swiglu
from sputnik_kernels.fp8 import fp8_grouped_mm, fp8_linear
from sputnik_kernels.moe import permute, routing_metadata, unpermute
from model.moe import Experts


class FP8Linear(nn.Linear):
    """nn.Linear whose matmul (and both gradients) run on FP8 operands."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight)
        return y if self.bias is None else y + self.bias


class FP8Experts(Experts):
    """Routed experts whose three grouped GEMMs (and their gradients) run on FP8 operands."""

    def forward(self, x_MD: torch.Tensor, offsets_E: torch.Tensor | None = None, experts: slice | None = None, *,
                pairs: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Experts.forward's contract. Token-order input with pairs=(w_NK, idx_NK) (MoE's few-token
        CPU path) is sorted by expert here and run through the same FP8 grouped GEMMs: FP8 numerics
        are defined on the expert-sorted rows (the wgrad quantises 128-token tiles of them), so a
        per-pair FP8 variant would make results depend on which path the batch size picked, and on
        CPU, where the pair path exists, FP8 is an emulation for its numerics, not for speed."""
        if pairs is not None:
            w_NK, idx_NK = pairs
            meta = routing_metadata(idx_NK, self.w1.shape[0])
            return unpermute(self.forward(permute(x_MD, meta), meta.offsets_E), meta, w_NK)
        w1, w3, w2 = self.weights(experts)
        h_MI = swiglu(fp8_grouped_mm(x_MD, w1, offsets_E), fp8_grouped_mm(x_MD, w3, offsets_E))
        return fp8_grouped_mm(h_MI, w2, offsets_E)


_FP8_OF = {nn.Linear: FP8Linear, Experts: FP8Experts}
_PLAIN_OF = {v: k for k, v in _FP8_OF.items()}


def apply_fp8(model: nn.Module) -> list[str]:
    """Make the model's plain nn.Linear layers and routed experts compute in FP8; returns the names
    of the converted modules. Exact types only: subclasses (the output head) are left alone."""
    names = []
    for name, m in model.named_modules():
        fp8_cls = _FP8_OF.get(type(m))
        if fp8_cls is not None:
            m.__class__ = fp8_cls
            names.append(name)
    return names


def remove_fp8(model: nn.Module) -> list[str]:
    """Undo apply_fp8; returns the names of the modules switched back."""
    names = []
    for name, m in model.named_modules():
        plain_cls = _PLAIN_OF.get(type(m))
        if plain_cls is not None:
            m.__class__ = plain_cls
            names.append(name)
    return names
