"""The policy learner in-process (one DeepSpeed rank on gloo): each GRPO option it takes changes
the update as its formula says.

- `grpo.aggregation`: on the first minibatch of a step the ratio is 1, so the loss is -sum(A x
  completion tokens) divided by the option's normaliser (tokens, per sequence, or sequences x
  generation budget).
- `grpo.entropy_coef`: with all advantages 0 the surrogate has no gradient, so coefficient 0 leaves
  the policy bit-identical and a positive coefficient raises its entropy.
- `grpo.weight_decay`: with a zero gradient AdamW only decays, w -> w (1 - lr wd); `grpo.betas`
  reach the optimizer.
- issue 26 (no pass for the on-policy minibatch's old log-probs, length-sorted micro-batches): the
  loss and every gradient of each optimizer step equal a plain reference update's to rounding.
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
    from orchestrator.grpo.batch import pack_batch

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


# --- sampler/learner agreement (issue 20) ------------------------------------------------------


def learner_with(policy_dir, *overrides, exact=False):
    from orchestrator.config import load_config
    from orchestrator.grpo.learner import PolicyLearner

    import socket

    cfg = load_config(None, ["grpo.minibatch_size=64", *overrides]).grpo
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return PolicyLearner(str(policy_dir[0] / "hf"), cfg, rank=0, world=1, master_addr="127.0.0.1", master_port=port, pad_id=0, seed=0,
                         max_new_tokens=MAX_NEW, exact=exact)


@pytest.mark.parametrize("exact", [True, False])
def test_mismatch_meter_is_zero_in_exact_mode_and_reported_otherwise(policy_dir, exact):
    """A GRPO step on a real sampler's rollouts (same weights, same version): with rollout.exact
    the learner's log-probs and experts equal the sampler's exactly; without it they differ a little
    (absorbed vs expanded attention, other GEMM shapes) and the meter says so."""
    from orchestrator.grpo.rollout import RolloutSampler

    root, _ = policy_dir
    sampler = RolloutSampler(str(root / "hf"), str(root / "tokenizer.json"), template="r1", exact=exact)
    tasks = [{"id": "a", "prompt": "What is 2 + 3?"}, {"id": "b", "prompt": "What is 17 + 25?"}]
    ch = sampler.generate(tasks, [0, 1], None, 0, group_size=3, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, seed=0)
    assert [len(x) for x in ch.logprobs] == [len(c) for c in ch.completion_ids]
    m = learner_with(policy_dir, exact=exact).train([1.0, -1.0, 0.5, -0.5, 0.25, -0.25], 1, ch)
    keys = {"mismatch/logprob_abs_mean", "mismatch/logprob_abs_max", "mismatch/kl", "mismatch/routing_frac",
            "mismatch/routing_frac/layer_0", "mismatch/routing_frac/layer_1"}
    assert keys <= set(m)
    if exact:
        assert m["mismatch/logprob_abs_max"] == 0.0 and m["mismatch/kl"] == 0.0 and m["mismatch/routing_frac"] == 0.0
        assert m["ratio_max"] == 1.0  # the first update's ratio against the old log-probs is exactly 1 too
    else:
        assert 0 < m["mismatch/logprob_abs_max"] < 1e-4 and m["mismatch/logprob_abs_mean"] > 0


def with_behaviour(ch, lrn, shift):
    """The chunk with sampler log-probs = the learner's old log-probs - shift (ratio e^shift)."""
    import dataclasses

    from orchestrator.grpo.batch import pack_batch

    tokens, targets, _ = pack_batch(ch.prompt_ids, ch.completion_ids, 0)
    old, _, _ = lrn.engine.module.measure(tokens, targets)
    lps = [old[b, len(p) - 1 : len(p) - 1 + len(c)] - shift for b, (p, c) in enumerate(zip(ch.prompt_ids, ch.completion_ids))]
    return dataclasses.replace(ch, logprobs=lps)


def test_importance_correction_weights_the_surrogate_as_its_formula(policy_dir):
    """Sampler log-probs log 3 below the learner's (ratio 3). On the first minibatch the PPO ratio is
    1, so each token's surrogate is -A: tis (cap 2) doubles the loss of `none`, mis (band [1/2, 2])
    drops every token; `none` with behaviour log-probs is today's update, bit for bit."""
    import math

    ch = chunk(3)
    adv = [1.0, -0.5, 0.25, -1.0, 0.75, -0.2]
    lens = torch.tensor([len(c) for c in ch.completion_ids], dtype=torch.float64)
    plain = -float((torch.tensor(adv, dtype=torch.float64) * lens).sum() / lens.sum())
    base = learner_with(policy_dir, "grpo.lr=1e-2")
    shifted = with_behaviour(ch, base, math.log(3.0))
    m_none = base.train(adv, 1, shifted)
    today = learner_with(policy_dir, "grpo.lr=1e-2")
    today.train(adv, 1, ch)  # no behaviour log-probs at all
    assert today.weights_hash() == base.weights_hash() and m_none["loss"] == pytest.approx(plain, rel=1e-5)
    m_tis = learner_with(policy_dir, "grpo.importance=tis", "grpo.is_cap=2").train(adv, 1, shifted)
    assert m_tis["loss"] == pytest.approx(2 * plain, rel=1e-5) and m_tis["is/truncated_frac"] == 1.0
    assert m_tis["is/ratio_mean"] == pytest.approx(3.0, rel=1e-5)
    m_mis = learner_with(policy_dir, "grpo.importance=mis", "grpo.is_cap=2").train(adv, 1, shifted)
    assert m_mis["loss"] == 0.0 and m_mis["is/masked_frac"] == 1.0


def test_router_replay_removes_routing_mismatch_in_the_learner(policy_dir):
    """Sampler experts that the learner's router would not choose (0 and 1 for every position):
    without replay the meter reports most tokens routed differently, with replay none."""
    import dataclasses

    ch = chunk(4)
    L, K = 2, 2
    experts = [torch.tensor([0, 1], dtype=torch.uint8).expand(L, len(p) + len(c) - 1, K).clone()
               for p, c in zip(ch.prompt_ids, ch.completion_ids)]
    ch = dataclasses.replace(ch, logprobs=[torch.zeros(len(c)) for c in ch.completion_ids], experts=experts)
    adv = [1.0, -0.5, 0.25, -1.0, 0.75, -0.2]
    off = learner_with(policy_dir).train(adv, 1, ch)
    on = learner_with(policy_dir, "grpo.router_replay=true").train(adv, 1, ch)
    assert off["mismatch/routing_frac"] > 0.5 and on["mismatch/routing_frac"] == 0.0
    assert on["mismatch/routing_frac/layer_0"] == 0.0 and on["mismatch/routing_frac/layer_1"] == 0.0


# --- the same update, less work (issue 26) -----------------------------------------------------


def varied_chunk(n=16, seed=5):
    """Rows whose completions range from 2 to 90 tokens: the learner splits them into micro-batches."""
    import dataclasses

    ch = chunk(seed, n)
    g = torch.Generator().manual_seed(seed)
    comps = [torch.randint(3, 500, (int(x),), generator=g).tolist() for x in torch.linspace(2, 90, n).round()[torch.randperm(n, generator=g)]]
    return dataclasses.replace(ch, completion_ids=comps, groups=[i // 4 for i in range(n)], tokens=sum(map(len, comps)))


def reference_update(policy_dir, ch, adv, grpo, states, step):
    """Today's update written out plainly, on the plain model: one no-grad pass over the whole
    padded batch for the old log-probs, then each minibatch padded to the batch's longest row,
    rl.grpo.grpo_loss, backward. `states`: the learner's weights before each of its optimizer steps
    (so the optimizer need not be replayed). (losses, gradients) per optimizer step, and the entropy."""
    from orchestrator.grpo.batch import pack_batch
    from orchestrator.grpo.rollout import load_policy
    from rl.grpo import grpo_loss, importance_weights

    model = load_policy(str(policy_dir[0] / "hf")).eval()
    tokens, targets, mask = pack_batch(ch.prompt_ids, ch.completion_ids, 0)
    with torch.no_grad():
        old = model.token_logprobs(tokens, targets)
        logp_V = torch.log_softmax(model(tokens).float(), dim=-1)
        entropy = float(((-(logp_V.exp() * logp_V).sum(-1)) * mask).sum() / mask.sum())
    is_w = None
    if ch.logprobs is not None and grpo.importance != "none":
        sampler = torch.zeros_like(old)
        for b, (p, lp) in enumerate(zip(ch.prompt_ids, ch.logprobs)):
            sampler[b, len(p) - 1 : len(p) - 1 + len(lp)] = lp
        is_w, _ = importance_weights(old, sampler, mask, mode=grpo.importance, cap=grpo.is_cap)
    B = len(adv)
    n_mb = -(-B // min(grpo.minibatch_size, B))
    per_mb = -(-B // n_mb)
    g = torch.Generator().manual_seed(step)
    order = [torch.randperm(B, generator=g) for _ in range(grpo.epochs)]
    minibatches = [o[k * per_mb : (k + 1) * per_mb] for o in order for k in range(n_mb)]
    assert len(minibatches) == len(states)
    a = torch.tensor(adv)
    losses, grads = [], []
    for idx, state in zip(minibatches, states):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(state[n])
        model.zero_grad()
        logp = model.token_logprobs(tokens[idx], targets[idx])
        loss, _ = grpo_loss(logp.float(), old[idx], None, a[idx], mask[idx], clip_low=grpo.clip_low, clip_high=grpo.clip_high,
                            aggregation=grpo.aggregation, constant_len=MAX_NEW, is_weights=is_w[idx] if is_w is not None else None)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return losses, grads, entropy


@pytest.mark.parametrize("aggregation,importance", [("token", "none"), ("sequence", "tis"), ("constant", "mis")])
def test_update_equals_the_plain_reference(policy_dir, aggregation, importance, monkeypatch):
    """A step of 16 samples of 3-91 tokens in two minibatches, two epochs (four optimizer steps):
    the learner skips the old-log-prob pass for the first minibatch and trains length-sorted
    micro-batches; the loss and every parameter's gradient at each optimizer step equal the plain
    reference's to rounding, and so does the entropy metric."""
    import dataclasses

    from orchestrator.grpo.batch import MICRO_OVERHEAD_TOKENS, length_micro_batches

    monkeypatch.setitem(MICRO_OVERHEAD_TOKENS, "cpu", 16)  # cheap calls: several micro-batches per minibatch
    ch = varied_chunk()
    g = torch.Generator().manual_seed(7)
    adv = torch.randn(len(ch.completion_ids), generator=g).tolist()
    lengths = [len(p) + len(c) - 1 for p, c in zip(ch.prompt_ids, ch.completion_ids)]
    assert len(length_micro_batches(list(range(8)), lengths, 16)) > 2  # the case under test
    lrn = learner_with(policy_dir, "grpo.lr=1e-2", "grpo.minibatch_size=8", "grpo.epochs=2", f"grpo.aggregation={aggregation}",
                       f"grpo.importance={importance}", "grpo.is_cap=1.5")
    if importance != "none":  # behaviour log-probs up to e^{+-1} away: some tokens truncated or masked
        old, _, _ = reference_measure(lrn, ch)
        ch = dataclasses.replace(ch, logprobs=[o - torch.empty(len(o)).uniform_(-1, 1, generator=g) for o in old])
    states, grads = [], []
    engine_step = lrn.engine.step

    def recording_step(*args, **kwargs):  # the weights and gradients the optimizer is handed
        model = lrn.engine.module.model
        states.append({n: p.detach().clone() for n, p in model.named_parameters()})
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        return engine_step(*args, **kwargs)

    lrn.engine.step = recording_step
    m = lrn.train(adv, 3, ch)
    assert m["updates"] == 4
    losses, want, entropy = reference_update(policy_dir, ch, adv, lrn.cfg, states, step=3)
    assert m["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5, abs=1e-7)
    assert m["entropy"] == pytest.approx(entropy, rel=1e-5)
    for got, ref in zip(grads, want):
        assert ref.keys() <= got.keys() and all(not got[n].any() for n in got.keys() - ref.keys())  # DeepSpeed: zeros for unused
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=lambda s, n=n: f"{n}: {s}")
    assert any((s1[n] != s0[n]).any() for s0, s1 in zip(states, states[1:]) for n in s0)  # the later steps are off-policy


def reference_measure(lrn, ch):
    """The sampled tokens' log-probs per completion under the learner's current weights."""
    from orchestrator.grpo.batch import pack_batch

    tokens, targets, _ = pack_batch(ch.prompt_ids, ch.completion_ids, 0)
    old, _, _ = lrn.engine.module.measure(tokens, targets)
    return [old[b, len(p) - 1 : len(p) - 1 + len(c)] for b, (p, c) in enumerate(zip(ch.prompt_ids, ch.completion_ids))], None, None


def test_train_threads_apply_to_the_update_only(policy_dir):
    from orchestrator.config import load_config
    from orchestrator.grpo.learner import PolicyLearner

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = torch.get_num_threads()
    try:
        lrn = PolicyLearner(str(policy_dir[0] / "hf"), load_config(None, []).grpo, rank=0, world=1, master_addr="127.0.0.1",
                            master_port=port, pad_id=0, seed=0, max_new_tokens=MAX_NEW, threads=1, train_threads=2)
        seen = []
        lrn.engine.module.model.layers[0].register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
        lrn.train([1.0, -1.0, 0.5, -0.5, 0.25, -0.25], 1, chunk(6))
        assert seen and set(seen) == {2} and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_compiled_learner_makes_the_eager_update(policy_dir):
    """grpo.compile (issue 24): the learner's trunk and log-prob head compiled as graphs (aot_eager:
    the graphs inductor would compile, without code generation) give the eager learner's losses and
    weights after a step of two minibatches of length-sorted micro-batches (varied shapes: dynamic)."""
    from torch._dynamo.utils import counters

    ch = varied_chunk()
    adv = torch.randn(len(ch.completion_ids), generator=torch.Generator().manual_seed(3)).tolist()
    out = {}
    for compiled in (False, True):
        over = ["grpo.lr=1e-2", "grpo.minibatch_size=8"] + (["grpo.compile=true", "grpo.compile_backend=aot_eager"] if compiled else [])
        lrn = learner_with(policy_dir, *over)
        init = lrn.state_dict()
        counters.clear()
        m = lrn.train(adv, 3, ch)
        graphs = counters["stats"]["unique_graphs"]
        assert (graphs > 0) == compiled and not counters["graph_break"], (graphs, dict(counters["graph_break"]))
        out[compiled] = (m, lrn.state_dict())
    (m0, w0), (m1, w1) = out[False], out[True]
    assert m1["loss"] == pytest.approx(m0["loss"], rel=1e-5) and m1["entropy"] == pytest.approx(m0["entropy"], rel=1e-5)
    assert any((w0[k] != init[k]).any() for k in w0)  # the step moved the weights
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], rtol=1e-4, atol=1e-6, msg=lambda s, k=k: f"{k}: {s}")


def test_a_zero3_learner_built_partitioned_makes_the_zero0_update(policy_dir):
    """grpo.zero_stage=3 builds the policy partitioned as it loads (model.hf.from_hf_pretrained_zero3,
    issue 19): it starts from the checkpoint's weights and its step equals the ZeRO-0 learner's."""
    from model.hf import from_hf_pretrained

    ch = varied_chunk()
    adv = torch.randn(len(ch.completion_ids), generator=torch.Generator().manual_seed(4)).tolist()
    init = from_hf_pretrained(policy_dir[0] / "hf").state_dict()
    out = {}
    for stage in (0, 3):
        lrn = learner_with(policy_dir, "grpo.lr=1e-2", "grpo.minibatch_size=16", f"grpo.zero_stage={stage}")
        if stage == 3:
            assert all(hasattr(p, "ds_tensor") for p in lrn.engine.module.parameters())  # partitioned from the start
            start = lrn.state_dict()
            assert all(torch.equal(start[k], v) for k, v in init.items())
        out[stage] = (lrn.train(adv, 1, ch), lrn.state_dict())
    (m0, w0), (m3, w3) = out[0], out[3]
    assert m3["loss"] == pytest.approx(m0["loss"], rel=1e-5)
    # Adam divides by the gradient's magnitude: where one is ~0, reduction-order rounding moves a
    # weight visibly (a few of 65,536 embedding entries by 1e-4); compare the updates' norms
    update = torch.cat([(w0[k] - init[k]).flatten() for k in w0]).norm()
    diff = torch.cat([(w3[k] - w0[k]).flatten() for k in w0]).norm()
    assert update > 1e-2 and diff <= 1e-3 * update, (float(diff), float(update))


@pytest.mark.parametrize("replay", [False, True])
def test_activation_checkpointing_makes_the_same_update(policy_dir, replay):
    """grpo.activation_checkpointing recomputes each block in the update's backward (the attention
    runs again) and gives the same losses and weights; with router replay the recompute routes to
    the sampler's experts too (here experts the learner's router would not pick)."""
    import dataclasses

    ch = varied_chunk()
    if replay:
        L, K = 2, 2
        ch = dataclasses.replace(ch, logprobs=[torch.zeros(len(c)) for c in ch.completion_ids], experts=[
            torch.tensor([0, 1], dtype=torch.uint8).expand(L, len(p) + len(c) - 1, K).clone() for p, c in zip(ch.prompt_ids, ch.completion_ids)])
    adv = torch.randn(len(ch.completion_ids), generator=torch.Generator().manual_seed(6)).tolist()
    out = {}
    for ckpt in (False, True):
        lrn = learner_with(policy_dir, "grpo.lr=1e-2", "grpo.minibatch_size=8", f"grpo.router_replay={str(replay).lower()}",
                           f"grpo.activation_checkpointing={str(ckpt).lower()}")
        init, calls = lrn.state_dict(), [0]
        hook = lrn.engine.module.model.layers[0].attn.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        m = lrn.train(adv, 1, ch)
        hook.remove()
        out[ckpt] = (m, lrn.state_dict(), calls[0])
    (m0, w0, c0), (m1, w1, c1) = out[False], out[True]
    assert c1 > c0  # the backward ran the blocks again
    assert m1["loss"] == pytest.approx(m0["loss"], rel=1e-6) and m1["grad_norm"] == pytest.approx(m0["grad_norm"], rel=1e-5)
    assert any((w0[k] != init[k]).any() for k in w0)
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], rtol=1e-5, atol=1e-7, msg=lambda s, k=k: f"{k}: {s}")


def test_static_decode_sampler_makes_the_dynamic_samplers_rollouts(policy_dir):
    """rollout.static_decode=true (issue 24): the sampler decodes through one StaticDecoder kept
    across calls; its chunks hold the default sampler's completions and routed experts, log-probs
    to rounding, for prompts of different lengths and group sizes (early stops and bucket step-down:
    tests/model/test_model_generate.py) (one decoder serves both calls,
    remade only when a call needs more rows). Refused with exact mode, in config and actor."""
    from orchestrator.config import ConfigError, load_config
    from orchestrator.grpo.inputs import check_expert_parallel
    from orchestrator.grpo.rollout import RolloutSampler

    root, _ = policy_dir
    args = (str(root / "hf"), str(root / "tokenizer.json"))
    dynamic = RolloutSampler(*args, template="r1")
    static = RolloutSampler(*args, template="r1", static_decode=True)
    assert not dynamic.static and static.static  # unset: off on CPU
    tasks = [{"id": "a", "prompt": "What is 2 + 3?"}, {"id": "b", "prompt": "What is 17 + 25 + 41?"}]
    decoders = []
    for group_size, seed in ((3, 0), (2, 1), (5, 2)):
        kw = dict(group_size=group_size, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, seed=seed)
        want, got = dynamic.generate(tasks, [0, 1], None, 0, **kw), static.generate(tasks, [0, 1], None, 0, **kw)
        assert got.completion_ids == want.completion_ids and got.truncated == want.truncated
        for g, w in zip(got.logprobs, want.logprobs):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
        assert all(torch.equal(g, w) for g, w in zip(got.experts, want.experts))
        decoders.append(static.decoder)
    assert decoders[0] is decoders[1] is not decoders[2] and decoders[2].rows == 10  # 6 rows, then 4, then 10
    with pytest.raises(ValueError, match="exact mode"):
        RolloutSampler(*args, template="r1", exact=True, static_decode=True)
    cfg = load_config(None, ["rollout.static_decode=true", "rollout.exact=true"])
    with pytest.raises(ConfigError, match="rollout.static_decode"):
        check_expert_parallel(cfg)


def test_a_bf16_sampler_samples_from_its_bf16_weights(policy_dir):
    """rollout.dtype=bfloat16 (auto on GPUs): the sampler's weights are the export's rounded to bf16
    (balancing biases fp32), a weight sync lands rounded the same way, it decodes in bf16 (its
    latent cache too), and the log-probs it returns agree with the learner's teacher-forced pass on
    the same bf16 weights to bf16 rounding. auto on CPU keeps fp32."""
    from orchestrator.grpo.batch import LogProbs, pack_batch
    from orchestrator.grpo.rollout import RolloutSampler, load_policy

    root, _ = policy_dir
    args = (str(root / "hf"), str(root / "tokenizer.json"))
    fp32 = load_policy(args[0]).eval()
    assert RolloutSampler(*args, template="r1").model.embed.weight.dtype == torch.float32  # auto, on CPU
    s = RolloutSampler(*args, template="r1", dtype="bfloat16")
    params = {k for k, _ in fp32.named_parameters()}
    for k, v in s.model.state_dict().items():
        want = fp32.state_dict()[k]
        assert torch.equal(v, want.to(torch.bfloat16) if k in params else want), k
    moved = {k: v + 1e-3 if k in params else v for k, v in fp32.state_dict().items()}  # an fp32 learner's new weights
    s.load_weights(moved, 1)
    assert all(torch.equal(v, moved[k].to(v.dtype)) for k, v in s.model.state_dict().items())
    s.load_weights(fp32.state_dict(), 0)
    assert s.model.new_caches(1, 8)[0].buf_BSL.dtype == torch.bfloat16
    tasks = [{"id": "a", "prompt": "What is 2 + 3?"}, {"id": "b", "prompt": "What is 17 + 25?"}]
    ch = s.generate(tasks, [0, 1], None, 0, group_size=3, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, seed=0)
    tokens, targets, mask = pack_batch(ch.prompt_ids, ch.completion_ids, 0)

    with torch.no_grad():
        lp = LogProbs(s.model)(tokens, targets).float()
    gaps = torch.cat([(lp[b, len(p) - 1 : len(p) - 1 + len(c)] - ch.logprobs[b]).abs()
                      for b, (p, c) in enumerate(zip(ch.prompt_ids, ch.completion_ids))])
    assert len(gaps) == mask.sum()
    print(f"|sampler - learner| log-prob on bf16 weights: mean {gaps.mean():.2e}, max {gaps.max():.2e}")
    assert gaps.mean() < 5e-3 and gaps.max() < 5e-2  # measured 1.15e-3 mean, 3.97e-3 max (fp32: 1.85e-7, 4.77e-7)
