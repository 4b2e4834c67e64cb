"""Multi-head Latent Attention (DeepSeek-V2 section 2.1, used unchanged in V3).

Queries: optionally compressed (wq_a -> RMSNorm -> wq_b), split into a "nope" part and a RoPE part.
Keys/values: compressed into one latent c_kv (wkv_a, RMSNorm) plus one RoPE key shared by all
heads; wkv_b expands c_kv into per-head keys and values.

Two paths:
- training / full forward: expand the latent and run ordinary attention;
- inference with a `LatentCache`: cache only c_kv and the rotated RoPE key
  (kv_lora_rank + qk_rope_head_dim values per token per layer) and absorb wkv_b into the query
  (keys) and the output (values), so the cache is never expanded. The attention over the cache is
  sputnik_kernels/mla_decode.py: a Triton kernel on CUDA, torch ops otherwise; without a mask the
  new tokens attend causally (the last T slots are theirs). With `start_pos` a device tensor (the
  static decode step, model/static_decode.py) the new latents are written at that slot and the
  queries attend over the whole cache view under mask_BTS: fixed shapes, no host read.
With `exact` set (Transformer.set_exact, `rollout.exact`), both run the absorbed form with the
batch-invariant primitives of model/exact.py, so that decoding and training agree bit for bit.

Shapes: B batch, T new tokens, S cached positions, H heads, C kv_lora_rank, R rope dim.
Test: `pytest tests/model/test_model_attention.py tests/model/test_model_generate.py tests/model/test_model_hf.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model import exact as bi
from model.args import ModelArgs
from model.norm import RMSNorm
from model.rope import apply_rotary_emb, yarn_softmax_scale
from sputnik_kernels.mla_decode import mla_decode


@dataclass
class LatentCache:
    """Per-layer MLA cache, one buffer [B, S, C + R]: the normalised latent, then the rotated shared
    RoPE key, so that one batched matmul scores a query against both."""

    buf_BSL: torch.Tensor
    kv_rank: int

    @classmethod
    def empty(cls, args: ModelArgs, batch: int, max_len: int, device=None, dtype=torch.float32) -> "LatentCache":
        buf = torch.zeros(batch, max_len, args.kv_lora_rank + args.qk_rope_head_dim, device=device, dtype=dtype)
        return cls(buf, args.kv_lora_rank)

    @property
    def kv_BSC(self) -> torch.Tensor:
        return self.buf_BSL[..., : self.kv_rank]

    @property
    def pe_BSR(self) -> torch.Tensor:
        return self.buf_BSL[..., self.kv_rank :]


class MLA(nn.Module):
    exact = False  # batch-invariant mode (Transformer.set_exact)

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.pad_v = args.attn_pad_v
        self.n_heads = args.n_heads
        self.nope, self.rope, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.kv_rank = args.kv_lora_rank
        qk_dim = args.qk_head_dim
        if args.q_lora_rank:
            self.wq_a = nn.Linear(args.dim, args.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps)
            self.wq_b = nn.Linear(args.q_lora_rank, args.n_heads * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(args.dim, args.n_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(args.dim, args.kv_lora_rank + args.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(args.kv_lora_rank, args.norm_eps)
        self.wkv_b = nn.Linear(args.kv_lora_rank, args.n_heads * (args.qk_nope_head_dim + args.v_head_dim), bias=False)
        self.wo = nn.Linear(args.n_heads * args.v_head_dim, args.dim, bias=False)
        self.softmax_scale = yarn_softmax_scale(args)

    def forward(
        self,
        x_BTD: torch.Tensor,
        freqs_BTr: torch.Tensor,
        *,
        cache: LatentCache | None = None,
        start_pos: int | torch.Tensor = 0,
        mask_BTS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.exact:
            return self._forward_exact(x_BTD, freqs_BTr, cache, start_pos, mask_BTS)
        B, T, _ = x_BTD.shape
        q = self.wq_b(self.q_norm(self.wq_a(x_BTD))) if hasattr(self, "wq_a") else self.wq(x_BTD)
        q_nope, q_pe = q.view(B, T, self.n_heads, -1).split([self.nope, self.rope], dim=-1)
        q_pe = apply_rotary_emb(q_pe, freqs_BTr)
        c_kv, k_pe = self.wkv_a(x_BTD).split([self.kv_rank, self.rope], dim=-1)
        c_kv = self.kv_norm(c_kv)
        k_pe = apply_rotary_emb(k_pe, freqs_BTr)  # (B, T, R), shared by all heads
        if cache is None:
            out = self._expanded(q_nope, q_pe, c_kv, k_pe, mask_BTS)
        elif isinstance(start_pos, torch.Tensor):
            # Static decoding (model/static_decode.py): the slot is a device tensor and the cache a
            # fixed-length view, so the step has fixed shapes and no host read (a CUDA graph);
            # mask_BTS says which slots each query sees (its prompt and what is written so far).
            assert mask_BTS is not None, "a device start_pos needs mask_BTS"
            slot_T = start_pos.view(1) + torch.arange(T, device=start_pos.device)
            cache.buf_BSL.index_copy_(1, slot_T, torch.cat([c_kv, k_pe], dim=-1).to(cache.buf_BSL.dtype))
            out = self._absorbed(q_nope, q_pe, cache.buf_BSL, mask_BTS)
        else:
            end = start_pos + T
            cache.buf_BSL[:, start_pos:end] = torch.cat([c_kv, k_pe], dim=-1).to(cache.buf_BSL.dtype)
            out = self._absorbed(q_nope, q_pe, cache.buf_BSL[:, :end], mask_BTS)
        return self.wo(out.flatten(2))

    def _expanded(self, q_nope, q_pe, c_kv, k_pe, mask_BTS):
        B, T, H, _ = q_nope.shape
        kv = self.wkv_b(c_kv).view(B, T, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, H, T, nope+R)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, T, H, self.rope)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        qk_dim = self.nope + self.rope
        if self.pad_v and self.v_dim < qk_dim:
            # The fused attention kernels (flash on CUDA, the flash-style CPU kernel) need one head
            # dim for q, k and v; otherwise SDPA falls back to the unfused math path (an MLA layer's
            # forward+backward 1.1x slower at 256 tokens, 1.4x at 512, tiny preset on CPU:
            # benchmarks/model_attention.py). Zero columns of v give zero output columns.
            v = F.pad(v, (0, qk_dim - self.v_dim))
        if mask_BTS is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_BTS.unsqueeze(1), scale=self.softmax_scale)
        return o[..., : self.v_dim].transpose(1, 2)  # (B, T, H, v)

    def _absorbed(self, q_nope, q_pe, cache_BSL, mask_BTS):
        """Attention against the cached latents with wkv_b absorbed: the query's nope part is taken
        into latent space per head (q_nope @ W_uk[h]) and joined to its RoPE part, so one batched
        matmul with the cache gives the scores; the output, still latent, is expanded by W_uv[h]."""
        B, T, H, _ = q_nope.shape
        C = self.kv_rank
        w = self.wkv_b.weight.view(H, self.nope + self.v_dim, C)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # (H, nope, C), (H, v, C)
        q_lat = torch.matmul(q_nope.permute(2, 0, 1, 3).reshape(H, B * T, self.nope), w_uk)  # (H, B*T, C)
        q = torch.cat([q_lat.view(H, B, T, C).permute(1, 2, 0, 3), q_pe.to(q_lat.dtype)], dim=-1)  # (B, T, H, C+R)
        # scores against the whole cache row, softmax, weighted sum of the latents: one Triton kernel
        # on CUDA (FlashMLA-style), torch's bmm / softmax / bmm otherwise (sputnik_kernels/mla_decode.py)
        o_lat = mla_decode(q, cache_BSL, C, self.softmax_scale, mask_BTS)  # (B, T, H, C)
        o = torch.matmul(o_lat.reshape(B * T, H, C).transpose(0, 1), w_uv.transpose(1, 2))  # (H, B*T, v)
        return o.transpose(0, 1).view(B, T, H, self.v_dim)

    def _forward_exact(self, x_BTD, freqs_BTr, cache, start_pos, mask_BTS):
        """The absorbed form for cached decoding and whole sequences alike, from batch-invariant
        pieces (model/exact.py). Reads the weights directly: not for ZeRO-3 partitioned modules."""
        B, T, _ = x_BTD.shape
        H, C = self.n_heads, self.kv_rank
        if hasattr(self, "wq_a"):
            q = bi.linear(self.q_norm(bi.linear(x_BTD, self.wq_a.weight)), self.wq_b.weight)
        else:
            q = bi.linear(x_BTD, self.wq.weight)
        q_nope, q_pe = q.view(B, T, H, -1).split([self.nope, self.rope], dim=-1)
        q_pe = apply_rotary_emb(q_pe, freqs_BTr)
        c_kv, k_pe = bi.linear(x_BTD, self.wkv_a.weight).split([C, self.rope], dim=-1)
        kv_BSL = torch.cat([self.kv_norm(c_kv), apply_rotary_emb(k_pe, freqs_BTr)], dim=-1)
        if cache is not None:
            end = start_pos + T
            cache.buf_BSL[:, start_pos:end] = kv_BSL.to(cache.buf_BSL.dtype)
            kv_BSL = cache.buf_BSL[:, :end]
            if mask_BTS is None and T > 1:  # the new tokens attend causally, as the absorbed path does
                slots, rows = torch.arange(end, device=x_BTD.device), start_pos + torch.arange(T, device=x_BTD.device)
                mask_BTS = (slots.unsqueeze(0) <= rows.unsqueeze(1)).unsqueeze(0).expand(B, T, end)
        elif mask_BTS is None:
            causal = torch.ones(T, T, dtype=torch.bool, device=x_BTD.device).tril()
            mask_BTS = causal.unsqueeze(0).expand(B, T, T)
        w = self.wkv_b.weight.view(H, self.nope + self.v_dim, C)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # (H, nope, C), (H, v, C)
        q_lat = torch.stack([bi.linear(q_nope[:, :, h], w_uk[h].t()) for h in range(H)], dim=2)  # (B, T, H, C)
        q_BTHL = torch.cat([q_lat, q_pe.to(q_lat.dtype)], dim=-1)
        S = kv_BSL.shape[1]
        scores = torch.stack([bi.linear(q_BTHL[b].reshape(T * H, -1), kv_BSL[b]) for b in range(B)])  # one GEMM per row
        scores = scores.view(B, T, H, S).float() * self.softmax_scale
        if mask_BTS is not None:
            scores = scores.masked_fill(~mask_BTS.unsqueeze(2), float("-inf"))
        e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        p = (e / bi.seq_sum(e, dim=-1, keepdim=True)).to(kv_BSL.dtype)
        o_lat = bi.weighted_sum(p, kv_BSL[..., :C])  # (B, T, H, C)
        o = torch.stack([bi.linear(o_lat[:, :, h], w_uv[h]) for h in range(H)], dim=2)  # (B, T, H, v)
        return bi.linear(o.flatten(2), self.wo.weight)
