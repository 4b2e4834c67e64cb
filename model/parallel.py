"""Parallelism applied to a built model, outside the model code (torchtitan style):
activation checkpointing, expert parallelism (routed experts sharded over a process group,
tokens exchanged with all_to_all_single) and torch.compile of the training entry points.

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


def apply_compile(model: Transformer, methods: tuple[str, ...], *, backend: str = "inductor") -> None:
    """torch.compile(fullgraph=True) each of the model's `methods` (e.g. "loss_terms",
    "token_logprobs", "hidden") in place, as an instance attribute: the module, its parameter names
    and DeepSpeed's view of it stay as they are, and callers of model.loss / model.token_logprobs get
    the compiled graph. dynamic=True: micro-batches change length from call to call (issue 24;
    tests/model/test_model_compile.py shows the paths have no graph break)."""
    for name in methods:
        setattr(model, name, torch.compile(getattr(model, name), fullgraph=True, dynamic=True, backend=backend))


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of the routed-expert weights (sharded under expert parallelism)."""
    return [n for n, _ in model.named_parameters() if ".experts.w" in n]


def expert_slice(n_experts: int, part: int, k: int) -> slice:
    """The routed experts that part `part` of `k` holds: [part * E/k, (part + 1) * E/k)."""
    return slice(part * n_experts // k, (part + 1) * n_experts // k)


def expert_shard_state(state: dict[str, torch.Tensor], part: int, k: int) -> dict[str, torch.Tensor]:
    """A whole model's state dict with the routed experts cut to part `part` of `k` (the state an
    expert-parallel rank loads): other tensors as they are, experts as copies of their slice (a
    view would pickle, and so travel with, the whole storage)."""
    out = {}
    for name, t in state.items():
        if ".experts.w" in name:
            t = t[expert_slice(t.shape[0], part, k)].clone()
        out[name] = t
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (in_splits, out_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        in_splits, out_splits = ctx.splits
        out = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return out, None, None, None


def _routed_expert_parallel(moe: MoE, group, x_ND: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
    """Dispatch (token, expert) pairs to the rank owning the expert, run, and combine back."""
    ep = dist.get_world_size(group)
    n_local = moe.n_experts // ep
    order = idx_NK.flatten().argsort(stable=True)  # pairs sorted by global expert = by owner rank
    token = order // moe.topk
    counts = torch.bincount(idx_NK.flatten(), minlength=moe.n_experts)  # (E,)
    # every rank learns how many pairs each rank sends to each of its local experts
    counts_from = torch.empty_like(counts)
    dist.all_to_all_single(counts_from, counts, group=group)  # [src rank, local expert] flattened
    send = counts.view(ep, n_local).sum(1).tolist()
    recv_by_src = counts_from.view(ep, n_local)
    recv = recv_by_src.sum(1).tolist()
    x_recv = _AllToAll.apply(x_ND[token], recv, send, group)
    # received rows are grouped by source rank; regroup by local expert for the grouped GEMM
    local_expert = torch.repeat_interleave(torch.arange(n_local).repeat(ep), recv_by_src.flatten())
    regroup = local_expert.argsort(stable=True)
    y = moe.experts(x_recv[regroup], torch.bincount(local_expert, minlength=n_local).cumsum(0), moe.ep_slice)
    y = torch.empty_like(y).index_copy(0, regroup, y)  # back to source-rank order
    y_back = _AllToAll.apply(y, send, recv, group)
    y_back = y_back * w_NK.flatten()[order].unsqueeze(-1)
    return torch.zeros_like(x_ND).index_add_(0, token, y_back)


def apply_expert_parallel(model: Transformer, group=None, shard_weights: bool = True) -> None:
    """Run each MoE layer's routed experts expert-parallel over `group`: rank r computes experts
    [r * E/ep, (r+1) * E/ep) for the tokens of every rank in the group, exchanged all-to-all.

    shard_weights=True keeps only this rank's slice of the expert weights (their gradients then
    carry every group member's tokens). shard_weights=False keeps the whole stacked weights,
    identical on every rank, and computes with the local slice: the other slices get zero
    gradient here, so a plain data-parallel average over all ranks (what DeepSpeed ZeRO does with
    ordinary parameters) is exactly the gradient of the global batch — this is how pretraining
    runs expert parallelism inside DeepSpeed, whose ZeRO stage then shards the weights and their
    optimizer states. Gate, shared experts and all other weights stay replicated. Call before
    building the optimizer. A model that already holds only this rank's experts (loaded with
    `from_hf_pretrained(experts=(rank, ep))`) keeps them as they are.
    """
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    for moe in [m for m in model.modules() if isinstance(m, MoE)]:
        if moe.n_experts % ep:
            raise ValueError(f"expert-parallel size {ep} does not divide n_routed_experts {moe.n_experts}")
        n_local = moe.n_experts // ep
        sl = expert_slice(moe.n_experts, rank, ep)
        held = moe.experts.w1.shape[0]
        if held != moe.n_experts and not (shard_weights and held == n_local):
            raise ValueError(f"a MoE layer holds {held} of {moe.n_experts} experts: neither all nor this rank's {n_local}")
        if shard_weights and held == moe.n_experts:
            for name in ("w1", "w2", "w3"):
                full = getattr(moe.experts, name)
                setattr(moe.experts, name, nn.Parameter(full.detach()[sl].clone()))
        moe.ep_slice = None if shard_weights else sl
        moe.routed = lambda x, w, idx, _m=moe: _routed_expert_parallel(_m, group, x, w, idx)
