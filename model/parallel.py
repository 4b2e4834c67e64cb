"""Parallelism applied to a built model, outside the model code (torchtitan style):
activation checkpointing and expert parallelism (routed experts sharded over a process group,
tokens exchanged with all_to_all_single).

Test: `pytest tests/model/test_model_parallel.py`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from model.moe import MoE
from model.transformer import Block, Transformer


def apply_activation_checkpointing(model: Transformer) -> int:
    """Recompute each Block's activations in the backward pass; returns the number of blocks."""
    n = 0
    for m in model.modules():
        if isinstance(m, Block):
            m.activation_checkpointing = True
            n += 1
    return n


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of the routed-expert weights (sharded under expert parallelism)."""
    return [n for n, _ in model.named_parameters() if ".experts.w" in n]
