"""DeepSeekMoE: the gate against transformers' router, sort-based dispatch against a per-token
reference, the aux-loss-free bias update and the sequence-wise balance loss against their formulas."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model import ModelArgs
from model.moe import MoE, grouped_mm

ARGS = ModelArgs(dim=32, moe_inter_dim=16, n_routed_experts=8, n_activated_experts=3, n_expert_groups=4,
                 n_limited_groups=2, route_scale=2.5, seq_aux_loss_alpha=0.01)


def make_moe(seed=0, **overrides):
    torch.manual_seed(seed)
    m = MoE(dataclasses.replace(ARGS, **overrides))
    for p in m.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    with torch.no_grad():
        m.gate.bias.uniform_(-0.2, 0.2)
    return m


def test_gate_matches_transformers_router():
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = transformers.DeepseekV3Config(hidden_size=32, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                                        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)
    ref = DeepseekV3TopkRouter(cfg)
    m = make_moe()
    with torch.no_grad():
        ref.weight.copy_(m.gate.weight)
        ref.e_score_correction_bias.copy_(m.gate.bias)
    x = torch.randn(50, 32)
    _, w_ref, i_ref = ref(x)
    w, i, _ = m.gate(x)
    order_ref, order = i_ref.sort(-1), i.sort(-1)
    assert torch.equal(order.values, order_ref.values)
    assert torch.allclose(w.gather(1, order.indices), w_ref.gather(1, order_ref.indices), atol=1e-6)


def test_experts_chosen_on_biased_scores_weights_from_unbiased():
    m = make_moe()
    x = torch.randn(20, 32)
    with torch.no_grad():
        m.gate.bias.zero_()
        m.gate.bias[5] = 10.0  # expert 5 always chosen, its weight still the unbiased affinity
    w, idx, s = m.gate(x)
    assert (idx == 5).any(-1).all()
    chosen = s.gather(1, idx)
    assert torch.allclose(w, chosen / chosen.sum(-1, keepdim=True) * 2.5, atol=1e-6)


def reference_moe(m, x):
    """Per-token loop: sum_k w_k * expert_k(x) + shared(x)."""
    w, idx, _ = m.gate(x)
    out = torch.zeros_like(x)
    for t in range(x.size(0)):
        for k in range(idx.size(1)):
            e = idx[t, k]
            h = F.silu(x[t] @ m.experts.w1[e]) * (x[t] @ m.experts.w3[e])
            out[t] += w[t, k] * (h @ m.experts.w2[e])
    return out + m.shared_experts(x)


@pytest.mark.parametrize("path", ["sorted", "pairs"])
def test_dispatch_matches_per_token_reference_with_grads(path):
    # sorted: routing_metadata / permute / grouped GEMM / unpermute; pairs: each (token, expert)
    # pair's weights gathered into batched matmuls (Experts._forward_pairs, used for a few tokens)
    m = make_moe(moe_pair_path_bytes=0 if path == "sorted" else 1 << 40)
    x = torch.randn(2, 13, 32, requires_grad=True)
    y = m(x)
    x2 = x.detach().clone().requires_grad_(True)
    ref = reference_moe(m, x2.view(-1, 32)).view(2, 13, 32)
    assert torch.allclose(y, ref, atol=1e-5)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    gx, gw = x.grad.clone(), m.experts.w1.grad.clone()
    m.zero_grad()
    (ref * g).sum().backward()
    assert torch.allclose(gx, x2.grad, atol=1e-5) and torch.allclose(gw, m.experts.w1.grad, atol=1e-5)


@pytest.mark.parametrize("limit", [ARGS.moe_pair_path_bytes, 40_000])
def test_decode_sized_batches_take_the_pair_path_and_larger_ones_do_not(limit):
    m = make_moe(moe_pair_path_bytes=limit)
    calls = []  # rows of each pair-path call, seen by a hook on the experts' forward
    m.experts.register_forward_pre_hook(lambda mod, a, kw: calls.append(a[0].shape[0]) if kw.get("pairs") else None, with_kwargs=True)
    pair_bytes = 3 * 32 * 16 * 4  # one expert's w1, w3, w2 in fp32
    few = limit // (pair_bytes * ARGS.n_activated_experts)  # tokens whose pairs fit
    m(torch.randn(1, few, 32))
    m(torch.randn(1, few + 1, 32))
    assert few >= 1 and calls == [few]


def test_grouped_mm_with_empty_experts():
    x, w = torch.randn(7, 5), torch.randn(4, 5, 3)
    offsets = torch.tensor([0, 4, 4, 7])  # experts 0 and 2 get no rows
    y = grouped_mm(x, w, offsets)
    ref = torch.cat([x[:4] @ w[1], x[4:] @ w[3]])
    assert torch.allclose(y, ref, atol=1e-6)


def test_load_counts_and_bias_update_formula():
    m = make_moe().train()
    x = torch.randn(3, 10, 32)
    _, idx, _ = m.gate(x.view(-1, 32))
    m(x)
    expected = torch.bincount(idx.flatten(), minlength=8).float()
    assert torch.equal(m.load, expected)
    bias0 = m.gate.bias.clone()
    m.update_bias(m.load.clone(), speed=0.01)
    delta = 0.01 * torch.sign(expected.mean() - expected)
    assert torch.allclose(m.gate.bias, bias0 + delta - delta.mean(), atol=1e-7)
    assert m.load.sum() == 0


def test_sequence_aux_loss_formula():
    m = make_moe().train()
    x = torch.randn(2, 9, 32)
    m(x)
    w, idx, s = m.gate(x.view(-1, 32))
    s, idx = s.view(2, 9, 8), idx.view(2, 9, 3)
    total = 0.0
    for b in range(2):
        f = torch.stack([(idx[b] == i).sum() for i in range(8)]).float() * 8 / (3 * 9)
        p = (s[b] / s[b].sum(-1, keepdim=True)).mean(0)
        total += 0.01 * (f * p).sum()
    assert torch.allclose(m.aux_loss, total / 2, atol=1e-6)


def test_router_stays_fp32_under_bf16_autocast():
    m = make_moe()
    x = torch.randn(16, 32)
    w_ref, i_ref, s_ref = m.gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, i, s = m.gate(x)
    assert s.dtype == torch.float32 and torch.equal(i, i_ref) and torch.allclose(s, s_ref)


def test_balancing_state_stays_fp32_when_the_model_is_cast_to_bf16():
    """A bf16 sampler (model.to(torch.bfloat16)) keeps the balancing bias and the loads fp32, as
    DeepSpeed's bf16 mode keeps a learner's buffers: the bias keeps its fp32 value (routing follows
    it, not a rounding of it) and a count goes past 256 (in bf16, 256 + 1 rounds back to 256)."""
    m = make_moe()
    with torch.no_grad():
        m.gate.bias.add_(1e-4)  # values bf16 cannot hold
    bias = m.gate.bias.clone()
    m = m.to(torch.bfloat16).train()
    assert m.gate.weight.dtype == m.experts.w1.dtype == torch.bfloat16
    assert m.gate.bias.dtype == m.load.dtype == torch.float32 and torch.equal(m.gate.bias, bias)
    x = torch.randn(2, 400, 32).to(torch.bfloat16)  # 2,400 (token, expert) pairs over 8 experts
    with torch.no_grad():
        m(x)
    expected = torch.bincount(m.routed_idx_NK.flatten(), minlength=8).float()
    assert expected.max() > 256 and torch.equal(m.load, expected)
