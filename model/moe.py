"""DeepSeekMoE (V3 section 2.1.2): shared experts + fine-grained routed experts, sigmoid gate with
group-limited top-k and auxiliary-loss-free balancing.

Gate: s = sigmoid(x W^T) in fp32; experts are *chosen* on s + bias (the balancing bias), groups
scored by the sum of their top-2 biased affinities and only the best n_limited_groups kept; the
gate *weights* come from the unbiased s, normalised over the chosen experts when norm_topk, times
route_scale.

Dispatch (sputnik_kernels/moe.py): the (token, expert) pairs are sorted by expert into contiguous segments
(routing_metadata, permute), the routed experts run as a grouped GEMM over those segments, and
the results are summed back per token weighted by the gate (unpermute) — no Python loop over
tokens. Triton on CUDA, the torch references otherwise (SPUTNIK_KERNELS). For a handful of tokens
on CPU (decoding) each (token, expert) pair's weights are gathered instead and run as batched
matmuls (Experts._forward_pairs, up to ModelArgs.moe_pair_path_bytes), which avoids the fixed cost
of the sort.

torch.compile (issue 24): the training path has no host sync and no data-dependent shape, so it
compiles with fullgraph=True — loads counted by index_add (not bincount), offsets stay tensors,
and under compile grouped_mm is the opaque custom op `sputnik::grouped_mm`. The exact mode below
(a loop over the experts present) is eager only.

Router replay (issue 20, `grpo.router_replay`): `MoE.replay_idx_NK`, when set, is the expert choice
of every token (the sampler's); the gate weights still come from this layer's own affinities s,
so gradients reach the router. `MoE.routed_idx_NK` keeps the choice of the last forward, for the
sampler/learner routing comparison. With `exact` set (Transformer.set_exact) the gate and the
experts use the batch-invariant primitives of model/exact.py.

The balancing state (Gate.bias, MoE.load) stays fp32 when the model is cast to bf16 (a bf16
sampler, `model.to(torch.bfloat16)`), as DeepSpeed's bf16 mode keeps buffers for the learners: in
bf16 a count stops at 256 (256 + 1 rounds to 256) and a bias step of 1e-3 vanishes beside a bias
above 0.25.

Shapes: N tokens, D dim, E routed experts, K activated experts, I expert hidden size.
Test: `pytest tests/model/test_model_moe.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sputnik_kernels import swiglu
from sputnik_kernels.moe import grouped_mm, permute, routing_metadata, unpermute
from model import exact as bi
from model.args import ModelArgs


class Fp32Buffers(nn.Module):
    """A module whose buffers named in FP32_BUFFERS keep their fp32 values through a dtype cast
    (moved with the module to its new device, never rounded)."""

    FP32_BUFFERS: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        keep = {n: self._buffers[n] for n in self.FP32_BUFFERS}
        super()._apply(fn, recurse)
        for n, old in keep.items():
            new = self._buffers[n]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[n] = old.to(new.device)
        return self


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    exact = False  # batch-invariant mode (Transformer.set_exact)

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact:
            return bi.linear(bi.silu(bi.linear(x, self.w1.weight)) * bi.linear(x, self.w3.weight), self.w2.weight)
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class Gate(Fp32Buffers):
    exact = False  # batch-invariant mode (Transformer.set_exact)
    FP32_BUFFERS = ("bias",)

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.topk, self.n_groups, self.topk_groups = args.n_activated_experts, args.n_expert_groups, args.n_limited_groups
        self.score_func, self.route_scale, self.norm_topk = args.score_func, args.route_scale, args.norm_topk
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        # Balancing bias: a buffer, changed only by `update_bias`, never by gradients.
        self.register_buffer("bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))

    def forward(self, x_ND: torch.Tensor, replay_NK: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (weights [N, K], expert indices [N, K], unbiased affinities s [N, E]), router in fp32.
        `replay_NK`: use these experts instead of choosing (router replay); weights from s as usual."""
        with torch.autocast(x_ND.device.type, enabled=False):  # routing stays fp32 under bf16 autocast
            logits = (bi.linear if self.exact else F.linear)(x_ND.float(), self.weight.float())
        if self.score_func == "sigmoid":
            s = bi.sigmoid(logits) if self.exact else logits.sigmoid()
        else:
            s = logits.softmax(dim=-1)
        if replay_NK is not None:
            assert replay_NK.shape == (x_ND.size(0), self.topk), (tuple(replay_NK.shape), x_ND.size(0), self.topk)
            idx_NK = replay_NK.to(device=s.device, dtype=torch.long)
            return self._weights(s, idx_NK), idx_NK, s
        biased = s + self.bias
        if self.n_groups > 1:
            g = biased.view(x_ND.size(0), self.n_groups, -1)
            group_scores = g.topk(2, dim=-1).values.sum(-1)  # (N, groups)
            keep = group_scores.topk(self.topk_groups, dim=-1).indices
            group_mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            biased = g.masked_fill(group_mask.unsqueeze(-1), float("-inf")).flatten(1)
        idx_NK = biased.topk(self.topk, dim=-1).indices
        return self._weights(s, idx_NK), idx_NK, s

    def _weights(self, s_NE: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        w_NK = s_NE.gather(1, idx_NK)
        if self.norm_topk:
            w_NK = w_NK / (w_NK.sum(-1, keepdim=True) + 1e-20)
        return w_NK * self.route_scale


class Experts(nn.Module):
    """Routed experts with stacked weights, so a grouped GEMM runs them all at once."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))  # gate, x @ w1[e]
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))  # up
        self.w2 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # down
        self.dim, self.inter_dim = dim, inter_dim

    def weights(self, experts: slice | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, w3, w2), or their slice for `experts` (expert parallelism with whole weights)."""
        if experts is None:
            return self.w1, self.w3, self.w2
        return self.w1[experts], self.w3[experts], self.w2[experts]

    def forward(self, x_MD: torch.Tensor, offsets_E: torch.Tensor | None = None, experts: slice | None = None, *,
                pairs: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Rows of x sorted by expert; offsets[e] = end row of expert e (of `experts` when given).
        With pairs=(w_NK, idx_NK) instead: x is [N, D] in token order and the result is
        sum_k w[n, k] * expert_{idx[n, k]}(x[n]) (see _forward_pairs). Both go through forward, so
        that ZeRO-3's hooks gather the weights."""
        if pairs is not None:
            return self._forward_pairs(x_MD, *pairs)
        w1, w3, w2 = self.weights(experts)
        if x_MD.device.type == "cpu" and x_MD.shape[0] >= 16 * w1.shape[0]:
            # On CPU, gate and up in one grouped GEMM over [w1 | w3] (half the per-segment matmul
            # calls; routed experts 1.2x faster at the tiny preset, benchmarks/model_dispatch.py).
            # Not for a handful of rows (decoding), where copying the weights costs more than the
            # second call; nor on GPU, where each grouped GEMM is one kernel launch and the copy of
            # every expert's weights on every step would be pure overhead.
            gate, up = grouped_mm(x_MD, torch.cat([w1, w3], dim=2), offsets_E).chunk(2, dim=1)
        else:
            gate, up = grouped_mm(x_MD, w1, offsets_E), grouped_mm(x_MD, w3, offsets_E)
        return grouped_mm(swiglu(gate, up), w2, offsets_E)

    def pair_bytes(self) -> int:
        """Bytes of one expert's three weight matrices (from the shapes given at construction, which
        ZeRO-3's partitioned parameters no longer show)."""
        return 3 * self.dim * self.inter_dim * self.w1.element_size()

    def _forward_pairs(self, x_ND: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        """Each (token, expert) pair's weights gathered and the pairs run as batched matmuls: a few
        calls, no sort and no GEMM call per expert. For a handful of tokens (decoding), where the
        fixed cost of dispatch is the whole cost."""
        N, K = idx_NK.shape
        D = x_ND.shape[1]
        i = idx_NK.reshape(-1)
        x = x_ND.unsqueeze(1).expand(N, K, D).reshape(N * K, 1, D)
        h = swiglu(torch.bmm(x, self.w1.index_select(0, i)), torch.bmm(x, self.w3.index_select(0, i)))
        y = torch.bmm(h, self.w2.index_select(0, i)).view(N, K, D)
        return torch.bmm(w_NK.unsqueeze(1).to(y.dtype), y).squeeze(1)


class MoE(Fp32Buffers):
    exact = False  # batch-invariant mode (Transformer.set_exact)
    FP32_BUFFERS = ("load",)

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_experts, self.topk = args.n_routed_experts, args.n_activated_experts
        self.seq_aux_alpha = args.seq_aux_loss_alpha
        self.pair_path_bytes = args.moe_pair_path_bytes
        self.gate = Gate(args)
        self.experts = Experts(args.n_routed_experts, args.dim, args.moe_inter_dim)
        self.shared_experts = MLP(args.dim, args.n_shared_experts * args.moe_inter_dim) if args.n_shared_experts else None
        # Tokens routed to each expert since the last bias update (local to this rank).
        self.register_buffer("load", torch.zeros(args.n_routed_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None
        # Expert parallelism swaps this for an all-to-all version (model/parallel.py).
        self.routed = self._routed_local
        self.replay_idx_NK: torch.Tensor | None = None  # router replay: the experts to use (Transformer.routing_replay)
        self.routed_idx_NK: torch.Tensor | None = None  # the experts the last forward used
        self.recomputing = False  # inside activation checkpointing's recompute (Block.forward): no side effects

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x = x_BTD.reshape(-1, D)
        w_NK, idx_NK, s_NE = self.gate(x, self.replay_idx_NK)
        if self.training and not self.recomputing:
            with torch.no_grad():
                # index_add, not bincount: bincount's output shape depends on the ids (a graph
                # break and a host sync under torch.compile, issue 24); the counts are the same.
                self.load.index_add_(0, idx_NK.flatten(), torch.ones_like(idx_NK.flatten(), dtype=self.load.dtype))
        # computed in a recompute too (activation checkpointing replays the same saved tensors), kept only from the forward
        aux = self._seq_aux_loss(s_NE.view(B, T, -1), idx_NK.view(B, T, -1)) if self.training and self.seq_aux_alpha > 0 else None
        if not self.recomputing:
            self.routed_idx_NK, self.aux_loss = idx_NK.detach(), aux
        y = self.routed(x, w_NK.to(x.dtype), idx_NK)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(B, T, D)

    def _routed_local(self, x_ND: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        if self.exact:
            return self._routed_exact(x_ND, w_NK, idx_NK)
        if x_ND.device.type == "cpu" and idx_NK.numel() * self.experts.pair_bytes() <= self.pair_path_bytes:
            # A few tokens with small experts (decoding): gathering each pair's weights beats the
            # fixed cost of sorting and a GEMM call per expert (~0.2 ms on CPU). The copies grow
            # with tokens x expert size, so larger batches or experts take the sorted path.
            return self.experts(x_ND, pairs=(w_NK, idx_NK))
        meta = routing_metadata(idx_NK, self.n_experts)
        y_PD = self.experts(permute(x_ND, meta), meta.offsets_E)  # P = N*K rows, sorted by expert
        return unpermute(y_PD, meta, w_NK)

    def _routed_exact(self, x_ND: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        """Batch-invariant dispatch: each expert's rows through model/exact.py's linear, the K
        outputs added in rank order. Reads the weights directly: not for ZeRO-3 partitioned modules."""
        ex = self.experts
        y = x_ND.new_zeros(x_ND.shape)
        for k in range(idx_NK.size(1)):
            y_k = x_ND.new_zeros(x_ND.shape)
            for e in idx_NK[:, k].unique().tolist():
                rows = (idx_NK[:, k] == e).nonzero().squeeze(1)
                x_e = x_ND[rows]
                h = bi.silu(bi.linear(x_e, ex.w1[e].t())) * bi.linear(x_e, ex.w3[e].t())
                y_k = y_k.index_copy(0, rows, bi.linear(h, ex.w2[e].t()))
            y = y + w_NK[:, k : k + 1] * y_k
        return y

    def _seq_aux_loss(self, s_BTE: torch.Tensor, idx_BTK: torch.Tensor) -> torch.Tensor:
        """V3 eq. 17-20: alpha * sum_i f_i P_i per sequence, averaged over sequences."""
        B, T, E = s_BTE.shape
        chosen = torch.zeros(B, E, device=s_BTE.device).scatter_add_(1, idx_BTK.reshape(B, -1), torch.ones(B, T * self.topk, device=s_BTE.device))
        f = chosen * E / (self.topk * T)
        p = (s_BTE / s_BTE.sum(-1, keepdim=True)).mean(1)
        return self.seq_aux_alpha * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor, speed: float) -> None:
        """bias += speed * sign(mean(load) - load), centred so the mean bias stays 0; resets counts."""
        delta = speed * torch.sign(load_E.mean() - load_E.float())
        self.gate.bias += (delta - delta.mean()).to(self.gate.bias.device)
        self.load.zero_()
