"""Training loss: main CE + weighted MTP CE by hand; token log-probs; activation checkpointing."""

import torch
import torch.nn.functional as F

from model import Transformer, load_model_args
from model.parallel import apply_activation_checkpointing


def tiny(**kw):
    torch.manual_seed(0)
    return Transformer(load_model_args("tiny", vocab=101, seq_aux_loss_alpha=0.0, **kw))


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
    seq = torch.randint(0, 101, (2, 12))
    grads = []
    for ac in (False, True):
        m = tiny().train()
        if ac:
            assert apply_activation_checkpointing(m) == 4  # 3 layers + 1 MTP block
        loss, _ = m.loss(seq[:, :-1], seq[:, 1:])
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


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
