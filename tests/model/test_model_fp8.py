"""FP8 training of the tiny model (model/fp8.py; on CPU the torch reference emulates FP8): the right
layers are converted and reversibly, gradients stay close to fp32, and 200 training steps end
within 2% relative loss of the full-precision run (issue #4, item 4)."""

import statistics

import pytest
import torch
from torch import nn

from model import Transformer, load_model_args
from model.fp8 import FP8Experts, FP8Linear, apply_fp8, remove_fp8
from model.moe import Experts


def tiny():
    torch.manual_seed(0)
    return Transformer(load_model_args("tiny"))


def markov_batches(vocab: int, n: int, batch: int, seq: int, seed: int = 1) -> list[torch.Tensor]:
    """[batch, seq+1] token batches from a fixed random chain: each token has 4 equally likely
    successors, so the loss can fall from log(vocab) toward log(4)."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 4), generator=g)
    out = []
    for _ in range(n):
        s = torch.empty(batch, seq + 1, dtype=torch.long)
        s[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(seq):
            s[:, t + 1] = succ[s[:, t], torch.randint(0, 4, (batch,), generator=g)]
        out.append(s)
    return out


def test_apply_fp8_converts_linears_and_experts_but_not_embedding_head_or_gate():
    m = tiny()
    params = dict(m.named_parameters())
    keys = list(m.state_dict())
    names = apply_fp8(m)
    linears = {n for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and n != "head"}
    experts = {n for n, mod in m.named_modules() if isinstance(mod, Experts)}
    assert set(names) == linears | experts
    assert {"layers.0.attn.wq", "layers.0.attn.wkv_b", "layers.0.ffn.w1", "layers.1.ffn.shared_experts.w2",
            "layers.1.ffn.experts", "mtp.0.eh_proj", "mtp.0.block.ffn.experts"} <= set(names)
    assert all(isinstance(m.get_submodule(n), (FP8Linear, FP8Experts)) for n in names)
    assert type(m.head) is not FP8Linear and not isinstance(m.embed, FP8Linear)
    assert not any("gate" in n or "head" in n or "embed" in n for n in names)
    # same parameter objects, same state-dict keys: optimizers and checkpoints do not notice
    assert list(m.state_dict()) == keys and all(p is params[n] for n, p in m.named_parameters())
    assert sorted(remove_fp8(m)) == sorted(names)
    assert not any(isinstance(mod, (FP8Linear, FP8Experts)) for mod in m.modules())


def test_fp8_model_close_to_fp32_and_reversible():
    seq = markov_batches(512, 1, 4, 32)[0]
    ref, fp8 = tiny().train(), tiny().train()
    apply_fp8(fp8)
    results = []
    for m in (ref, fp8):
        loss, _ = m.loss(seq[:, :-1], seq[:, 1:])
        loss.backward()
        results.append((m(seq[:, :-1]).detach(), loss.item(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (logits, loss, grads), (logits8, loss8, grads8) = results
    # Each FP8 GEMM errs by ~4% (tests/kernels/test_kernels_fp8.py); through 3 blocks + MTP the
    # logits differ by ~8% and the loss by ~0.01% at init (measured), the gradients of the
    # non-MoE weights by 4-15%. The experts and router differ more (~30-50%): the perturbed
    # hidden states flip some top-k routing decisions, which moves whole tokens between experts.
    assert 0.01 < (logits8 - logits).norm() / logits.norm() < 0.15
    assert abs(loss8 - loss) / loss < 0.005
    assert grads.keys() == grads8.keys()
    errors = {n: ((grads8[n] - g).norm() / g.norm()).item() for n, g in grads.items()}
    moe = {n for n in errors if ".experts." in n or ".gate." in n}
    assert max(e for n, e in errors.items() if n not in moe) < 0.25
    assert max(errors[n] for n in moe) < 0.7
    assert statistics.median(errors.values()) > 0.02  # FP8 really ran
    remove_fp8(fp8)
    assert torch.equal(fp8(seq[:, :-1]), ref(seq[:, :-1]))


def train(model: Transformer, batches: list[torch.Tensor]) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for seq in batches:
        loss, metrics = model.loss(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_expert_bias(model.expert_loads())
        losses.append(metrics["loss"])
    return losses


@pytest.mark.slow
def test_fp8_training_matches_full_precision_within_2_percent():
    """200 AdamW steps of the tiny preset on the same batches from the same init, fp32 vs FP8
    emulation (~40 s on 2 CPU cores, FP8 about 4x the fp32 step on CPU). Measured here: the final
    losses (mean of the last 10 steps) differ by ~0.1%."""
    batches = markov_batches(512, 200, 8, 32)
    ref, fp8 = tiny().train(), tiny().train()
    apply_fp8(fp8)
    losses, losses8 = train(ref, batches), train(fp8, batches)
    final, final8 = statistics.mean(losses[-10:]), statistics.mean(losses8[-10:])
    assert final < 0.5 * losses[0]  # it learned the chain
    assert losses8 != losses  # FP8 changed the numerics
    assert abs(final8 - final) / final < 0.02, (final, final8)
