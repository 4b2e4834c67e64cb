"""Training loss: main CE + weighted MTP CE by hand, the sequence-wise aux loss of every MoE layer;
token log-probs; activation checkpointing; the aux-loss-free bias update, MTP module included."""

import torch
import torch.nn.functional as F

from model import Transformer, load_model_args
from model.parallel import apply_activation_checkpointing


def tiny(**kw):
    torch.manual_seed(0)
    return Transformer(load_model_args("tiny", **{"vocab": 101, "seq_aux_loss_alpha": 0.0, **kw}))


def test_loss_is_ce_plus_weighted_mtp():
    m = tiny()
    seq = torch.randint(0, 101, (2, 17))
    tokens, targets = seq[:, :-1], seq[:, 1:]
    loss, metrics = m.loss(tokens, targets)
    h = m.hidden(tokens)
    ce = F.cross_entropy(m.head(m.norm(h)).flatten(0, 1), targets.flatten())
    # MTP depth 1 by hand: position i combines h_i with emb(token i+1) and predicts token i+2
    mod = m.mtp[0]
    x = mod.eh_proj(torch.cat([mod.enorm(m.embed(seq[:, 1:-1])), mod.hnorm(h[:, :-1])], -1))
    hm = mod.block(x, m.freqs_cis[:15].unsqueeze(0))
    mtp = F.cross_entropy(m.head(mod.norm(hm)).flatten(0, 1), seq[:, 2:].flatten())
    assert torch.allclose(loss, ce + 0.3 * mtp, atol=1e-5)
    assert abs(metrics["ce_loss"] - ce.item()) < 1e-5 and abs(metrics["mtp_loss"] - mtp.item()) < 1e-5


def test_token_logprobs_match_log_softmax():
    m = tiny()
    seq = torch.randint(0, 101, (3, 9))
    lp = m.token_logprobs(seq[:, :-1], seq[:, 1:])
    ref = torch.log_softmax(m(seq[:, :-1]), -1).gather(-1, seq[:, 1:, None]).squeeze(-1)
    assert torch.allclose(lp, ref, atol=1e-5)


def test_activation_checkpointing_same_grads():
    """The same gradients, expert loads and aux losses with and without checkpointing: the backward's
    recompute neither counts a block's tokens again nor replaces its aux loss by the recomputed graph
    (which kept the recomputed activations alive until the next forward)."""
    seq = torch.randint(0, 101, (2, 12))
    grads, loads, aux = [], [], []
    for ac in (False, True):
        m = tiny(seq_aux_loss_alpha=0.01).train()
        if ac:
            assert apply_activation_checkpointing(m) == 4  # 3 layers + 1 MTP block
        loss, _ = m.loss(seq[:, :-1], seq[:, 1:])
        before = [moe.aux_loss for moe in m.moe_layers()]
        loss.backward()
        assert all(moe.aux_loss is a for moe, a in zip(m.moe_layers(), before))  # the forward's, not the recompute's
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
        loads.append(m.expert_loads())
        aux.append(torch.stack([a.detach() for a in before]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert torch.equal(loads[0], loads[1])
    assert torch.allclose(aux[0], aux[1])


def test_a_few_steps_reduce_loss():
    m = tiny().train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    seq = torch.randint(0, 101, (4, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(30):
        loss, _ = m.loss(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.update_expert_bias(m.expert_loads())
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert m.expert_bias().abs().sum() > 0 and m.expert_loads().sum() == 0


def test_mtp_moe_loads_and_bias_follow_the_aux_loss_free_rule():
    m = tiny(bias_update_speed=0.01).train()
    moe = m.mtp[0].block.ffn
    assert m.moe_layers() == [m.layers[1].ffn, m.layers[2].ffn, moe]  # main layers, then MTP
    chosen = []  # the MTP gate's expert choices, seen by a hook
    moe.gate.register_forward_hook(lambda mod, inp, out: chosen.append(out[1]))
    seq = torch.randint(0, 101, (4, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        m.loss(seq[:, :-1], seq[:, 1:])
    n = torch.bincount(torch.cat(chosen).flatten(), minlength=8).float()
    loads, bias0 = m.expert_loads(), m.expert_bias()
    assert loads.shape == (3, 8) and torch.equal(loads[2], n) and n.sum() == 4 * 31 * 2  # 31 MTP positions, top-2
    m.update_expert_bias(loads)
    # REFERENCE aux-loss-free rule: delta = speed * sign(mean(n) - n), centred
    delta = 0.01 * torch.sign(n.mean() - n)
    assert torch.allclose(m.expert_bias()[2], bias0[2] + delta - delta.mean(), atol=1e-7)
    assert m.expert_loads().sum() == 0


def test_mtp_bias_updates_balance_the_mtp_experts():
    m = tiny(bias_update_speed=0.02).train()
    with torch.no_grad():
        m.mtp[0].block.ffn.gate.bias[:2] = 0.5  # experts 0 and 1 take every MTP token
    seq = torch.randint(0, 101, (4, 33), generator=torch.Generator().manual_seed(3))
    imbalance = []  # max / mean tokens per MTP expert
    for _ in range(30):
        with torch.no_grad():
            m.loss(seq[:, :-1], seq[:, 1:])
        loads = m.expert_loads()
        imbalance.append((loads[2].max() / loads[2].mean()).item())
        m.update_expert_bias(loads)
    assert imbalance[0] == 4.0  # 2 of 8 experts hold all pairs
    assert max(imbalance[-5:]) < 1.6, imbalance  # measured: ~1.4 after 15 updates


def test_loss_adds_the_sequence_aux_loss_of_every_moe_layer_that_ran():
    m = tiny(seq_aux_loss_alpha=0.01).train()
    seq = torch.randint(0, 101, (2, 17))
    loss, metrics = m.loss(seq[:, :-1], seq[:, 1:])
    aux = [moe.aux_loss for moe in m.moe_layers()]
    assert all(a is not None for a in aux) and len(aux) == 3  # MTP's included
    ce_mtp = metrics["ce_loss"] + 0.3 * metrics["mtp_loss"]
    assert abs(metrics["seq_aux_loss"] - sum(a.item() for a in aux)) < 1e-6
    assert abs(loss.item() - ce_mtp - metrics["seq_aux_loss"]) < 1e-5
    m.loss(seq[:, :1], seq[:, 1:2])  # one position: the MTP module does not run
    assert m.mtp[0].block.ffn.aux_loss is None
