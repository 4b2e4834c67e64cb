"""MLA's training path (expanded latent, SDPA) against attention written out by hand, with v padded
to the q/k head dim for SDPA's fused kernels (ModelArgs.attn_pad_v) and without: same outputs and
gradients."""

import pytest
import torch

from model import load_model_args
from model.attention import MLA
from model.rope import apply_rotary_emb, precompute_freqs_cis


def attention_by_hand(m: MLA, x_BTD, freqs):
    """softmax(q k^T * scale, causal) v per head, from the layer's own projections."""
    B, T, _ = x_BTD.shape
    H = m.n_heads
    q_nope, q_pe = m.wq(x_BTD).view(B, T, H, -1).split([m.nope, m.rope], dim=-1)
    c_kv, k_pe = m.wkv_a(x_BTD).split([m.kv_rank, m.rope], dim=-1)
    k_nope, v = m.wkv_b(m.kv_norm(c_kv)).view(B, T, H, -1).split([m.nope, m.v_dim], dim=-1)
    q = torch.cat([q_nope, apply_rotary_emb(q_pe, freqs)], dim=-1)  # (B, T, H, nope+R)
    k = torch.cat([k_nope, apply_rotary_emb(k_pe, freqs).unsqueeze(2).expand(B, T, H, m.rope)], dim=-1)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * m.softmax_scale
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    o = torch.einsum("bhts,bshd->bthd", p, v)  # (B, T, H, v)
    return m.wo(o.flatten(2))


@pytest.mark.parametrize("pad_v", [True, False])
def test_expanded_attention_matches_hand_written_with_and_without_padding(pad_v):
    args = load_model_args("tiny", attn_pad_v=pad_v)
    assert args.v_head_dim < args.qk_head_dim  # padding has something to do
    torch.manual_seed(0)
    m = MLA(args)
    for p in m.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    freqs = precompute_freqs_cis(args)[:9].unsqueeze(0)
    x = torch.randn(2, 9, args.dim, requires_grad=True)
    y = m(x, freqs)
    x2 = x.detach().clone().requires_grad_(True)
    ref = attention_by_hand(m, x2, freqs)
    assert torch.allclose(y, ref, atol=1e-5)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    gx, gw = x.grad.clone(), m.wkv_b.weight.grad.clone()
    m.zero_grad()
    (ref * g).sum().backward()
    assert torch.allclose(gx, x2.grad, atol=1e-5) and torch.allclose(gw, m.wkv_b.weight.grad, atol=1e-5)
