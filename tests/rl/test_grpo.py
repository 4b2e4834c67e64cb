"""GRPO pure functions against hand-computed values and autograd gradients."""

import math

import pytest
import torch

from rl.grpo import aggregate, group_advantages, grpo_loss, pass_at_k, zero_variance_groups


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    a = group_advantages(r, scale="std", eps=0.0 + 1e-6)
    std = math.sqrt(((0.5**2) * 4) / 3)  # sample std of (1, 0, 0, 1)
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6))
    assert torch.equal(a[1], torch.zeros(4))  # all equal: no signal, no NaN
    assert torch.equal(group_advantages(r, scale="none")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert zero_variance_groups(r).tolist() == [False, True]
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, scale="max")
    with pytest.raises(ValueError, match="group >= 2"):
        group_advantages(torch.ones(3, 1))


def test_clipped_surrogate_values_and_clip_fractions():
    old = torch.zeros(2, 3)
    # ratios: e^0.5 = 1.65 (above 1 + 0.28), 1.0, e^-0.5 = 0.61 (below 1 - 0.2)
    logp = torch.tensor([[0.5, 0.0, -0.5], [0.5, 0.0, -0.5]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 3)
    loss, m = grpo_loss(logp, old, None, adv, mask, clip_low=0.2, clip_high=0.28, aggregation="token")
    e = math.exp(0.5)
    # A > 0: -min(r, clip(r)) = -1.28, -1, -0.6065 ; A < 0: max(r, clip(r)) = 1.6487, 1, 0.8
    expected = [-1.28, -1.0, -math.exp(-0.5), e, 1.0, 0.8]
    assert loss.item() == pytest.approx(sum(expected) / 6, abs=1e-6)
    assert m["clip_frac_high"] == pytest.approx(1 / 6) and m["clip_frac_low"] == pytest.approx(1 / 6)


def test_gradient_of_surrogate_matches_formula():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.5, 0.0, -0.1]], requires_grad=True)
    adv = torch.tensor([2.0])
    loss, _ = grpo_loss(logp, old, None, adv, torch.ones(1, 3), clip_low=0.2, clip_high=0.28, aggregation="token")
    loss.backward()
    # d/dlogp of -A*ratio/3 is -A*ratio/3 where not clipped; 0 where clipped (ratio 1.65 > 1.28, A > 0)
    expected = torch.tensor([[0.0, -2.0 / 3, -2.0 * math.exp(-0.1) / 3]])
    assert torch.allclose(logp.grad, expected, atol=1e-6)


def test_k3_kl_in_loss_and_its_gradient():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    loss, m = grpo_loss(logp, logp.detach(), ref, torch.zeros(1), torch.ones(1, 2), kl_beta=0.1, aggregation="token")
    d = ref - logp.detach()
    kl = torch.exp(d) - d - 1
    assert loss.item() == pytest.approx(0.1 * kl.mean().item(), abs=1e-7)
    assert m["kl"] == pytest.approx(kl.mean().item(), abs=1e-7)
    loss.backward()
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp)
    assert torch.allclose(logp.grad, 0.1 * (1 - torch.exp(d)) / 2, atol=1e-7)
    loss0, m0 = grpo_loss(logp, logp.detach(), ref, torch.zeros(1), torch.ones(1, 2), kl_beta=0.0)
    assert "kl" not in m0 and loss0.item() == 0.0


def test_aggregations_by_hand():
    per = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(per, mask, "token").item() == pytest.approx(10 / 4)
    assert aggregate(per, mask, "sequence").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(per, mask, "constant").item() == pytest.approx(10 / 6)
    with pytest.raises(ValueError):
        aggregate(per, mask, "mean")


def test_entropy_bonus_lowers_loss():
    logp = torch.zeros(1, 2)
    ent = torch.tensor([[1.0, 3.0]])
    loss, m = grpo_loss(logp, logp, None, torch.zeros(1), torch.ones(1, 2), entropy=ent, entropy_coef=0.01)
    assert loss.item() == pytest.approx(-0.01 * 2.0) and m["entropy"] == pytest.approx(2.0)


def test_pass_at_k():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


# --- sampler/learner agreement (issue 20) ------------------------------------------------------


def test_importance_weights_tis_and_mis_by_hand():
    from rl.grpo import importance_weights

    # ratios exp(learner - sampler): 3, 1, 0.25, e^0.5 = 1.65, and a padded position
    sampler = torch.tensor([[0.0, -1.0, 0.0, -0.5, 0.0]])
    learner = torch.tensor([[math.log(3.0), -1.0, math.log(0.25), 0.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    w, m = importance_weights(learner, sampler, mask, mode="tis", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, 0.25, math.exp(0.5), 0.0]]))
    assert m["is/truncated_frac"] == pytest.approx(0.25) and m["is/ratio_mean"] == pytest.approx((3 + 1 + 0.25 + math.exp(0.5)) / 4)
    w, m = importance_weights(learner, sampler, mask, mode="mis", cap=2.0)  # band [0.5, 2]: 3 and 0.25 leave it
    assert w.tolist() == [[0.0, 1.0, 0.0, 1.0, 0.0]] and m["is/masked_frac"] == pytest.approx(0.5)
    w, _ = importance_weights(learner, sampler, mask, mode="none", cap=2.0)
    assert w.tolist() == [mask.tolist()[0]]
    with pytest.raises(ValueError, match="importance mode"):
        importance_weights(learner, sampler, mask, mode="ppo", cap=2.0)


def test_is_weights_scale_each_tokens_surrogate_not_the_normaliser():
    logp = torch.tensor([[0.1, -0.2, 0.0], [0.0, 0.3, 0.0]], requires_grad=True)
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    w = torch.tensor([[2.0, 0.5, 0.0], [1.0, 1.5, 1.0]])
    loss, _ = grpo_loss(logp, old, None, adv, mask, clip_low=0.2, clip_high=0.28, aggregation="token", is_weights=w)
    r = torch.exp(logp.detach())
    a = adv.unsqueeze(1)
    per = torch.maximum(-a * r, -a * r.clamp(0.8, 1.28)) * w
    assert loss.item() == pytest.approx(float((per * mask).sum() / 5), abs=1e-7)
    plain, _ = grpo_loss(logp, old, None, adv, mask, aggregation="token")
    ones, _ = grpo_loss(logp, old, None, adv, mask, aggregation="token", is_weights=torch.ones(2, 3))
    assert torch.equal(plain, ones)  # weights of 1 are today's loss, bit for bit


def test_behaviour_and_routing_mismatch_by_hand():
    from rl.grpo import behaviour_mismatch, routing_mismatch

    sampler = torch.tensor([[-1.0, -2.0, -3.0]])
    learner = torch.tensor([[-1.0, -1.5, -3.0 - math.log(2)]])
    mask = torch.ones(1, 3)
    m = behaviour_mismatch(learner, sampler, mask)
    d = [0.0, 0.5, -math.log(2)]
    assert m["logprob_abs_mean"] == pytest.approx(sum(abs(x) for x in d) / 3)
    assert m["logprob_abs_max"] == pytest.approx(math.log(2))
    assert m["kl"] == pytest.approx(sum(math.exp(x) - x - 1 for x in d) / 3)
    assert behaviour_mismatch(sampler, sampler, mask) == {"logprob_abs_mean": 0.0, "logprob_abs_max": 0.0, "kl": 0.0}
    # 2 layers, 1 sequence, 3 tokens, top-2: a set in another order is the same set
    a = torch.tensor([[[[0, 1], [2, 3], [4, 5]]], [[[0, 1], [2, 3], [4, 5]]]])
    b = torch.tensor([[[[1, 0], [2, 7], [4, 5]]], [[[0, 1], [2, 3], [5, 6]]]])
    r = routing_mismatch(a, b, mask)
    assert r == {"routing_frac": pytest.approx(2 / 3), "routing_frac/layer_0": pytest.approx(1 / 3), "routing_frac/layer_1": pytest.approx(1 / 3)}
    assert routing_mismatch(a, b, torch.tensor([[1.0, 0.0, 0.0]]))["routing_frac"] == 0.0
