"""Multi-head Latent Attention (DeepSeek-V2 section 2.1, used unchanged in V3).

Queries: optionally compressed (wq_a -> RMSNorm -> wq_b), split into a "nope" part and a RoPE part.
Keys/values: compressed into one latent c_kv (wkv_a, RMSNorm) plus one RoPE key shared by all
heads; wkv_b expands c_kv into per-head keys and values.

Two paths:
- training / full forward: expand the latent and run ordinary attention;
- inference with a `LatentCache`: cache only c_kv and the rotated RoPE key
  (kv_lora_rank + qk_rope_head_dim values per token per layer) and absorb wkv_b into the query
  (keys) and the output (values), so the cache is never expanded.

Shapes: B batch, T new tokens, S cached positions, H heads, C kv_lora_rank, R rope dim.
Test: `pytest tests/model/test_model_generate.py tests/model/test_model_hf.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.args import ModelArgs
from model.norm import RMSNorm
from model.rope import apply_rotary_emb, yarn_softmax_scale


@dataclass
class LatentCache:
    """Per-layer MLA cache: the normalised latent and the rotated shared RoPE key."""

    kv_BSC: torch.Tensor
    pe_BSR: torch.Tensor

    @classmethod
    def empty(cls, args: ModelArgs, batch: int, max_len: int, device=None, dtype=torch.float32) -> "LatentCache":
        return cls(
            torch.zeros(batch, max_len, args.kv_lora_rank, device=device, dtype=dtype),
            torch.zeros(batch, max_len, args.qk_rope_head_dim, device=device, dtype=dtype),
        )


class MLA(nn.Module):
    # Pad v to the q/k head dim so SDPA can use its fused kernels (benchmarks/model_attention.py
    # times both; the output is the same up to rounding).
    pad_v: bool = True

    def __init__(self, args: ModelArgs):
        super().__init__()
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
        start_pos: int = 0,
        mask_BTS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q = self.wq_b(self.q_norm(self.wq_a(x_BTD))) if hasattr(self, "wq_a") else self.wq(x_BTD)
        q_nope, q_pe = q.view(B, T, self.n_heads, -1).split([self.nope, self.rope], dim=-1)
        q_pe = apply_rotary_emb(q_pe, freqs_BTr)
        c_kv, k_pe = self.wkv_a(x_BTD).split([self.kv_rank, self.rope], dim=-1)
        c_kv = self.kv_norm(c_kv)
        k_pe = apply_rotary_emb(k_pe, freqs_BTr)  # (B, T, R), shared by all heads
        if cache is None:
            out = self._expanded(q_nope, q_pe, c_kv, k_pe, mask_BTS)
        else:
            cache.kv_BSC[:, start_pos : start_pos + T] = c_kv.to(cache.kv_BSC.dtype)
            cache.pe_BSR[:, start_pos : start_pos + T] = k_pe.to(cache.pe_BSR.dtype)
            end = start_pos + T
            out = self._absorbed(q_nope, q_pe, cache.kv_BSC[:, :end], cache.pe_BSR[:, :end], mask_BTS)
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

    def _absorbed(self, q_nope, q_pe, kv_BSC, pe_BSR, mask_BTS):
        w = self.wkv_b.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # (H, nope, C), (H, v, C)
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)
        scores = torch.einsum("bthc,bsc->bhts", q_lat, kv_BSC) + torch.einsum("bthr,bsr->bhts", q_pe, pe_BSR)
        scores = scores.float() * self.softmax_scale
        if mask_BTS is not None:
            scores = scores.masked_fill(~mask_BTS.unsqueeze(1), float("-inf"))
        p = scores.softmax(dim=-1).to(kv_BSC.dtype)
        o_lat = torch.einsum("bhts,bsc->bthc", p, kv_BSC)
        return torch.einsum("bthc,hdc->bthd", o_lat, w_uv)  # (B, T, H, v)
