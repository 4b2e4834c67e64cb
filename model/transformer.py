"""The DeepSeek-V3 transformer: embedding, Blocks (MLA + dense FFN or DeepSeekMoE), final norm,
output head, and multi-token prediction modules (V3 section 2.2).

`Transformer.forward(tokens)` returns the main head's logits; `loss(tokens, targets)` adds the MTP
loss: module k combines the previous depth's hidden state with the embedding of the token k steps
ahead and predicts the token after it, sharing the embedding and the output head.

Every MoE layer, the MTP modules' included, takes part in the auxiliary-loss-free balancing
(`expert_loads` / `update_expert_bias`, one row per layer of `moe_layers()`).

Issue 20 (sampler/learner agreement): `set_exact(True)` switches every layer to the batch-invariant
primitives of model/exact.py (decoding and training then agree bit for bit on CPU fp32);
`routed_experts()` reads the expert choice of the last forward and `routing_replay(idx)` imposes
one (router replay), on the main model's MoE layers.

Shapes: B batch, T positions, D dim, V vocab, L main-model MoE layers, K activated experts.
Test: `pytest tests/model/test_model_train.py tests/model/test_model_args.py`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sputnik_kernels import fused_linear_cross_entropy, fused_linear_logprobs
from model import exact as bi
from model.args import ModelArgs
from model.attention import MLA, LatentCache
from model.moe import MLP, MoE
from model.norm import RMSNorm
from model.rope import precompute_freqs_cis


class OutputHead(nn.Linear):
    """The output projection. Given targets it returns the cross-entropy or the targets'
    log-probabilities from `kernels` without materialising [tokens, vocab] logits; working inside
    forward() keeps ZeRO-3's parameter gathering hooks in charge of the weight. In exact mode the
    logits come from the batch-invariant linear and the log-probs from log_softmax over them, as
    the sampler computes them."""

    exact = False  # batch-invariant mode (Transformer.set_exact)

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None, *, mode: str = "logits", ignore_index: int = -100):
        if self.exact and mode != "ce":
            logits = bi.linear(h, self.weight)
            if targets is None:
                return logits
            return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        if targets is None:
            return super().forward(h)
        h2 = h.reshape(-1, h.size(-1))
        if mode == "ce":
            return fused_linear_cross_entropy(h2, self.weight, targets.reshape(-1), ignore_index)
        return fused_linear_logprobs(h2, self.weight, targets.reshape(-1).clamp(min=0)).view(targets.shape)


class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attn = MLA(args)
        self.ffn = MLP(args.dim, args.inter_dim) if layer_id < args.n_dense_layers else MoE(args)
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.activation_checkpointing = False

    def forward(self, x, freqs, cache=None, start_pos=0, mask=None):
        # only where a backward follows: pretraining's steps, a GRPO learner's update (in eval mode)
        if self.activation_checkpointing and torch.is_grad_enabled() and cache is None:
            calls = [0]

            def run(*a):
                # The backward's recompute repeats this forward: the MoE must not count its tokens
                # again nor keep the recomputed graph as its aux loss (which would hold the block's
                # recomputed activations until the next forward).
                moe = self.ffn if isinstance(self.ffn, MoE) else None
                if moe is not None:
                    moe.recomputing = calls[0] > 0
                calls[0] += 1
                try:
                    return self._forward(*a)
                finally:
                    if moe is not None:
                        moe.recomputing = False
            return checkpoint(run, x, freqs, None, start_pos, mask, use_reentrant=False)
        return self._forward(x, freqs, cache, start_pos, mask)

    def _forward(self, x, freqs, cache, start_pos, mask):
        x = x + self.attn(self.attn_norm(x), freqs, cache=cache, start_pos=start_pos, mask_BTS=mask)
        return x + self.ffn(self.ffn_norm(x))


class MTPModule(nn.Module):
    """One multi-token-prediction depth: h' = Block(eh_proj([enorm(emb(t_{i+k})); hnorm(h_i)]))."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.eh_proj = nn.Linear(2 * args.dim, args.dim, bias=False)
        self.block = Block(layer_id, args)
        self.norm = RMSNorm(args.dim, args.norm_eps)  # before the shared head

    def forward(self, h_BTD, emb_BTD, freqs):
        x = self.eh_proj(torch.cat([self.enorm(emb_BTD), self.hnorm(h_BTD)], dim=-1))
        return self.block(x, freqs)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab, args.dim)
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.head = OutputHead(args.dim, args.vocab, bias=False)
        # MTP modules use the MoE unless every layer of the main model is dense.
        mtp_layer_id = args.n_layers if args.n_dense_layers < args.n_layers else 0
        self.mtp = nn.ModuleList(MTPModule(mtp_layer_id, args) for _ in range(args.mtp_depth))
        self.register_buffer("freqs_cis", precompute_freqs_cis(args), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, self.args.init_std)
        if self.args.tie_embeddings:
            self.head.weight = self.embed.weight
        for m in self.moe_layers():
            m.gate.bias.zero_()

    # --- forward -------------------------------------------------------------------------------

    def _check_tokens(self, tokens: torch.Tensor, start_pos: int) -> None:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq] (got shape {tuple(tokens.shape)})")
        if isinstance(start_pos, torch.Tensor):
            # the static decode step (model/static_decode.py): its tokens are its own draws and its
            # caller checked the length on the host once, so the step reads nothing back (CUDA graph)
            return
        # The id range needs the values on the host: checked in eager mode only, so that a compiled
        # forward has no host sync (issue 24); out-of-range ids then fail in the embedding.
        if not torch.compiler.is_compiling() and tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.args.vocab):
            raise ValueError(f"tokens hold ids outside [0, {self.args.vocab}) (min {int(tokens.min())}, max {int(tokens.max())})")
        if start_pos + tokens.size(1) > self.args.max_seq_len:
            raise ValueError(f"sequence length {start_pos + tokens.size(1)} exceeds max_seq_len {self.args.max_seq_len}")

    def hidden(self, tokens, *, start_pos=0, caches=None, positions_BT=None, mask_BTS=None):
        """Final hidden states before the output norm: [B, T, D]. start_pos: the first cache slot
        of `tokens`; a 1-element device tensor in the static decode step (with positions_BT and
        mask_BTS; see MLA.forward)."""
        self._check_tokens(tokens, start_pos)
        T = tokens.size(1)
        if positions_BT is None:
            assert not isinstance(start_pos, torch.Tensor), "a device start_pos needs positions_BT"
            freqs = self.freqs_cis[start_pos : start_pos + T].unsqueeze(0)
        else:
            freqs = self.freqs_cis[positions_BT]
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs, caches[i] if caches is not None else None, start_pos, mask_BTS)
        return h

    def forward(self, tokens: torch.Tensor, *, start_pos: int | torch.Tensor = 0, caches=None, positions_BT=None, mask_BTS=None) -> torch.Tensor:
        """Main-head logits [B, T, V]."""
        h = self.hidden(tokens, start_pos=start_pos, caches=caches, positions_BT=positions_BT, mask_BTS=mask_BTS)
        return self.head(self.norm(h))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100, positions_BT=None,
             mask_BTS=None) -> tuple[torch.Tensor, dict]:
        """Main cross-entropy + mtp_loss_weight * mean MTP cross-entropy (+ the sequence-wise aux loss
        of every MoE layer this call ran, MTP's included) -> (loss, metrics as floats)."""
        total, terms = self.loss_terms(tokens, targets, ignore_index=ignore_index, positions_BT=positions_BT, mask_BTS=mask_BTS)
        return total, {k: v.item() for k, v in terms.items()}

    def loss_terms(self, tokens: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100, positions_BT=None,
                   mask_BTS=None) -> tuple[torch.Tensor, dict]:
        """`loss` with its metrics as detached 0-d tensors: no host sync, so the whole training
        forward compiles as one graph (`torch.compile(model.loss_terms, fullgraph=True)`, issue 24).
        With packed documents (`positions_BT`, `mask_BTS`: data/sft.py) the MTP modules, whose
        attention takes no mask, are left out: the loss is the main head's (and the aux loss)."""
        for m in self.moe_layers():
            m.aux_loss = None  # set again by each MoE layer that runs below
        h = self.hidden(tokens, positions_BT=positions_BT, mask_BTS=mask_BTS)
        ce = self.head(self.norm(h), targets, mode="ce", ignore_index=ignore_index)
        total, metrics = ce, {"ce_loss": ce.detach()}
        T = tokens.size(1)
        if self.mtp and T > len(self.mtp) and mask_BTS is None:
            mtp_losses = []
            h_prev = h
            for k, mod in enumerate(self.mtp, start=1):
                n = T - k  # positions i whose token i+k+1 exists
                emb = self.embed(targets[:, k - 1 : k - 1 + n].clamp(min=0))  # token i+k = target i+k-1
                h_prev = mod(h_prev[:, :n], emb, self.freqs_cis[:n].unsqueeze(0))
                mtp_losses.append(self.head(mod.norm(h_prev), targets[:, k : k + n], mode="ce", ignore_index=ignore_index))
            mtp = torch.stack(mtp_losses).mean()
            total = total + self.args.mtp_loss_weight * mtp
            metrics["mtp_loss"] = mtp.detach()
        aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        if aux:
            aux_loss = torch.stack(aux).sum()
            total = total + aux_loss
            metrics["seq_aux_loss"] = aux_loss.detach()
        metrics["loss"] = total.detach()
        return total, metrics

    def token_logprobs(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(targets[b, t] | tokens[b, :t+1]) under the main head: [B, T] (float32)."""
        return self.head(self.norm(self.hidden(tokens)), targets, mode="logprobs")

    # --- sampler/learner agreement (issue 20) --------------------------------------------------

    def set_exact(self, exact: bool = True) -> "Transformer":
        """Batch-invariant mode on every layer (model/exact.py); reads weights directly, so not
        for ZeRO-3 partitioned parameters."""
        from model.attention import MLA
        from model.moe import Gate

        for m in self.modules():
            if isinstance(m, (MLA, MoE, MLP, Gate, OutputHead)):
                m.exact = exact
        return self

    def main_moe_layers(self) -> list[MoE]:
        """The main model's MoE layers in depth order (the ones decoding and log-probs run)."""
        return [b.ffn for b in self.layers if isinstance(b.ffn, MoE)]

    def routed_experts(self) -> torch.Tensor:
        """Expert ids each main-model MoE layer chose in the last forward: [L, B*T, K] (long)."""
        layers = self.main_moe_layers()
        if not layers:
            return torch.zeros(0, 0, self.args.n_activated_experts, dtype=torch.long)
        return torch.stack([m.routed_idx_NK for m in layers])

    @contextlib.contextmanager
    def routing_replay(self, idx_LBTK: torch.Tensor | None):
        """Inside, each main-model MoE layer l routes token (b, t) to idx[l, b, t] (router replay);
        None replays nothing."""
        layers = self.main_moe_layers() if idx_LBTK is not None else []
        for m, idx in zip(layers, idx_LBTK if idx_LBTK is not None else []):
            m.replay_idx_NK = idx.reshape(-1, idx.shape[-1])
        try:
            yield
        finally:
            for m in layers:
                m.replay_idx_NK = None

    # --- load balancing ------------------------------------------------------------------------

    def moe_layers(self) -> list[MoE]:
        """Every MoE layer: the main model's in depth order, then each MTP module's. The MTP blocks
        route their own tokens with their own gate, so their bias is balanced like the others'."""
        blocks = list(self.layers) + [mod.block for mod in self.mtp]
        return [b.ffn for b in blocks if isinstance(b.ffn, MoE)]

    def expert_loads(self) -> torch.Tensor:
        """Tokens routed to each expert since the last bias update: [len(moe_layers()), E] (this rank)."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, self.args.n_routed_experts)
        return torch.stack([m.load for m in layers])

    def expert_bias(self) -> torch.Tensor:
        """The balancing biases, rows as in expert_loads: [len(moe_layers()), E]."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, self.args.n_routed_experts)
        return torch.stack([m.gate.bias for m in layers])

    @torch.no_grad()
    def update_expert_bias(self, loads: torch.Tensor) -> None:
        """Aux-loss-free update of every MoE layer, given expert_loads() summed over data-parallel ranks."""
        layers = self.moe_layers()
        assert loads.shape == (len(layers), self.args.n_routed_experts), (tuple(loads.shape), len(layers))
        for m, load in zip(layers, loads):
            m.update_bias(load, self.args.bias_update_speed)

    # --- caches --------------------------------------------------------------------------------

    def new_caches(self, batch: int, max_len: int) -> list[LatentCache]:
        p = self.embed.weight
        return [LatentCache.empty(self.args, batch, max_len, device=p.device, dtype=p.dtype) for _ in self.layers]

    def num_parameters(self, *, activated: bool = False, include_mtp: bool = False) -> int:
        """Total parameters, or those used per token (shared + n_activated of the routed experts)."""
        total = 0
        for name, p in self.named_parameters():
            if name.startswith("mtp.") and not include_mtp:
                continue
            n, shape = getattr(p, "ds_numel", p.numel()), getattr(p, "ds_shape", p.shape)  # DeepSpeed ZeRO-3: the whole size
            if activated and ".experts.w" in name:  # one expert's size (of however many this rank holds) x top-k
                n = n // shape[0] * self.args.n_activated_experts
            total += n
        return total
