"""The policy learner in-process (one DeepSpeed rank on gloo): each GRPO option it takes changes
the update as its formula says.

- `grpo.aggregation`: on the first minibatch of a step the ratio is 1, so the loss is -sum(A x
  completion tokens) divided by the option's normaliser (tokens, per sequence, or sequences x
  generation budget).
- `grpo.entropy_coef`: with all advantages 0 the surrogate has no gradient, so coefficient 0 leaves
  the policy bit-identical and a positive coefficient raises its entropy.
- `grpo.weight_decay`: with a zero gradient AdamW only decays, w -> w (1 - lr wd); `grpo.betas`
  reach the optimizer.
"""

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

MAX_NEW = 20


def chunk(seed=0, n=6):
    from orchestrator.grpo.rollout import RolloutChunk

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 500, (5,), generator=g).tolist() for _ in range(n)]
    comps = [torch.randint(3, 500, (int(torch.randint(3, MAX_NEW, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    return RolloutChunk(tasks=[{"id": str(i)} for i in range(n)], groups=[i // 2 for i in range(n)], prompt_ids=prompts,
                        completion_ids=comps, completions=[""] * n, truncated=[False] * n, versions=[0] * n, seconds=0.0,
                        tokens=sum(map(len, comps)))


def learner(policy_dir, *overrides):
    from orchestrator.config import load_config
    from orchestrator.grpo.learner import PolicyLearner

    cfg = load_config(None, ["grpo.minibatch_size=64", *overrides]).grpo
    root, _ = policy_dir
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return PolicyLearner(str(root / "hf"), cfg, rank=0, world=1, master_addr="127.0.0.1", master_port=port, pad_id=0, seed=0,
                         max_new_tokens=MAX_NEW)


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_aggregation_normalises_as_its_formula(policy_dir, aggregation):
    ch = chunk()
    adv = [1.0, -0.5, 0.25, -1.0, 0.75, -0.2]
    m = learner(policy_dir, f"grpo.aggregation={aggregation}").train(adv, 1, ch)
    lens = torch.tensor([len(c) for c in ch.completion_ids], dtype=torch.float64)
    a = torch.tensor(adv, dtype=torch.float64)
    want = {"token": -(a * lens).sum() / lens.sum(), "sequence": -a.mean(), "constant": -(a * lens).sum() / (len(adv) * MAX_NEW)}[aggregation]
    assert m["loss"] == pytest.approx(float(want), rel=1e-5)


def test_entropy_coef_raises_entropy_and_zero_leaves_the_policy(policy_dir):
    from orchestrator.grpo.learner import pack_batch

    ch = chunk(1)
    zero = [0.0] * len(ch.completion_ids)
    tokens, targets, mask = pack_batch(ch.prompt_ids, ch.completion_ids, 0)

    def entropy(lrn):
        with torch.no_grad():
            _, ent = lrn.engine.module(tokens, targets, entropy=True)
        return float((ent * mask).sum() / mask.sum())

    plain = learner(policy_dir, "grpo.lr=1e-2")
    before, e0 = plain.weights_hash(), entropy(plain)
    m = plain.train(zero, 1, ch)
    assert plain.weights_hash() == before and m["entropy"] == pytest.approx(e0, rel=1e-6)
    bonus = learner(policy_dir, "grpo.lr=1e-3", "grpo.entropy_coef=0.1")  # small steps: Adam at 1e-2 overshoots
    for step in range(1, 4):
        bonus.train(zero, step, ch)
    assert entropy(bonus) > e0 + 1e-2  # measured +0.022 (the maximum, log 512, is +0.027 away)


def test_weight_decay_and_betas_reach_adamw(policy_dir):
    lr, wd = 1e-2, 0.5
    lrn = learner(policy_dir, f"grpo.lr={lr}", f"grpo.weight_decay={wd}", "grpo.betas=[0.8,0.95]")
    group = lrn.engine.optimizer.param_groups[0]
    assert tuple(group["betas"]) == (0.8, 0.95) and group["weight_decay"] == wd
    before = lrn.state_dict()
    lrn.train([0.0] * 6, 1, chunk(2))  # zero advantages: a zero gradient, only the decay acts
    after = lrn.state_dict()
    w = "layers.0.attn.wq_a.weight" if "layers.0.attn.wq_a.weight" in before else next(k for k in before if k.endswith("weight"))
    torch.testing.assert_close(after[w], before[w] * (1 - lr * wd), rtol=1e-6, atol=1e-7)
