"""`grpo_loss(..., total=)`: a minibatch split into micro-batches (each padded to its own longest
row) gives losses that sum to the whole minibatch's, and gradients that sum to its gradient, for
every aggregation (issue 26)."""

import pytest
import torch

from rl.grpo import grpo_loss


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_micro_batch_losses_sum_to_the_minibatch_loss(aggregation):
    g = torch.Generator().manual_seed(0)
    B, T = 7, 13
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths.unsqueeze(1)).float()  # [B, T] right-padded rows
    logp = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g)
    ref = logp.detach() + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    kw = dict(clip_low=0.2, clip_high=0.28, kl_beta=0.05, aggregation=aggregation, constant_len=20)
    whole, _ = grpo_loss(logp, old, ref, adv, mask, **kw)
    (want,) = torch.autograd.grad(whole, logp)
    total = float(mask.sum()) if aggregation == "token" else float(B)
    parts = []
    for rows in ([0, 3], [1, 2, 6], [4, 5]):
        w = int(lengths[rows].max())
        loss, _ = grpo_loss(logp[rows, :w], old[rows, :w], ref[rows, :w], adv[rows], mask[rows, :w], total=total, **kw)
        parts.append(loss)
    got_loss = torch.stack(parts).sum()
    (got,) = torch.autograd.grad(got_loss, logp)
    torch.testing.assert_close(got_loss, whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
