"""The GRPO loop on real Ray actors and a real DeepSpeed learner (gloo on CPU).

Mechanics run on a randomly initialised tiny policy saved as an HF directory with a tokenizer
trained on the synthetic corpus: weight sync leaves samplers bit-identical to the learner, killed
samplers and reward workers (and expert-parallel groups, whole) are restarted and every prompt of the step is scored exactly once,
dynamic sampling drops zero-variance groups, and a resumed run repeats the uninterrupted one.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.grpo.rollout import load_policy

REPO = Path(__file__).resolve().parents[2]


def make_cfg(policy_dir, *overrides):
    from orchestrator.config import load_config

    root, _ = policy_dir
    return load_config(None, [
        f"grpo.init={root / 'hf'}", f"grpo.tokenizer={root / 'tokenizer.json'}", "grpo.prompts_per_step=4",
        "grpo.group_size=4", "grpo.heldout_size=4", "grpo.train_size=64", "rollout.max_new_tokens=24",
        "tracking.wandb_mode=disabled", "cluster.num_cpus=2", *overrides,
    ])


@pytest.fixture(scope="module")
def ray_session():
    from orchestrator.config import ClusterConfig
    from orchestrator.ray_local import init_ray

    ray = init_ray(ClusterConfig(num_cpus=2))
    yield ray
    ray.shutdown()


def driver_for(cfg, tmp_path):
    from orchestrator.grpo import Driver
    from orchestrator.tracking import Tracker

    tracker = Tracker(tmp_path, cfg.tracking, name="t")
    return Driver(cfg, tmp_path, tracker), tracker


@pytest.mark.ray
def test_weight_sync_is_bit_identical_and_versioned(policy_dir, ray_session, tmp_path):
    cfg = make_cfg(policy_dir, "rollout.num_samplers=2", "grpo.lr=1e-2")
    d, tracker = driver_for(cfg, tmp_path)
    ray = ray_session
    before = ray.get(d.learners[0].weights_hash.remote())
    batch = d.collect(d.sample_step(1), 1)
    adv, _ = d.advantages(batch.records)
    # a non-zero learning signal even if every reward is equal (random policy): a fixed ramp
    adv = [((i % 4) - 1.5) for i in range(len(adv))]
    d.learn(batch, adv, 1)
    learner = ray.get(d.learners[0].weights_hash.remote())
    samplers = ray.get([s.weights_hash.remote() for s in d.rollouts.samplers])
    assert learner != before  # the update changed the policy
    assert samplers == [learner, learner]  # and both samplers hold exactly the learner's weights
    # the next step is sampled by the new policy version, and the version lag is recorded as 0 (sync mode)
    batch = d.collect(d.sample_step(2), 2)
    assert {rec.version for rec in batch.records} == {1}
    d.close()
    tracker.close()


@pytest.mark.ray
def test_an_expert_parallel_sampler_group_samples_as_one_sampler(policy_dir, ray_session, tmp_path):
    """rollout.expert_parallel=2 (issue 21): two sampler actors hold one policy, each half of the
    routed experts; their chunks have the tokens, log-probs and routed experts of one in-process
    sampler holding the whole model with the same seeds, before and after an update; each member
    receives only its shard of the new weights. A member killed with chunks in flight: the group is
    restarted whole and its chunks come out as the one sampler's; the next sync reaches the new members."""
    import numpy as np

    from model.parallel import expert_shard_state
    from orchestrator.grpo.rollout import RolloutSampler, state_hash

    cfg = make_cfg(policy_dir, "rollout.num_samplers=2", "rollout.expert_parallel=2", "grpo.lr=1e-2")
    root, _ = policy_dir
    ray = ray_session
    one = RolloutSampler(str(root / "hf"), str(root / "tokenizer.json"), template=cfg.data.template)
    d, tracker = driver_for(cfg, tmp_path)
    members = ray.get([s.weights_hash.remote() for s in d.rollouts.samplers])
    full = one.model.state_dict()
    assert members == [state_hash(expert_shard_state(full, r, 2)) for r in range(2)]  # each holds only its experts
    E = next(v for k, v in full.items() if k.endswith("experts.w1")).shape[0]

    def same_as_one_sampler(step, kill=None):
        tasks = d.stream.take(4)
        gen, score = d.rollouts.launch(tasks, seed_key=(step, 0), group_size=4, temperature=1.0, weights=d.weights.sampler_weights,
                                       version=d.version)
        if kill is not None:  # a member dies with the chunks in flight: the group restarts and runs them again
            ray.kill(d.rollouts.samplers[kill], no_restart=True)
        gen, _ = d.rollouts.results(gen, score)
        chunks = ray.get(gen)
        per = len(chunks[0].tasks) // 4
        for c, chunk in enumerate(chunks):
            seed = int(np.random.default_rng([cfg.seed, step, 0, c]).integers(2**31))
            want = one.generate(tasks[c * per : (c + 1) * per], chunk.groups[::4], None, d.version, group_size=4,
                                max_new_tokens=cfg.rollout.max_new_tokens, temperature=1.0, top_p=cfg.rollout.top_p, seed=seed)
            assert chunk.completion_ids == want.completion_ids
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(chunk.logprobs, want.logprobs))
            assert all(torch.equal(a, b) for a, b in zip(chunk.experts, want.experts))
        return chunks

    chunks = same_as_one_sampler(1)
    assert len({len(ids) for ch in chunks for ids in ch.completion_ids}) > 1  # rows stopped at different steps
    batch = d.collect(d.sample_step(2), 2)
    d.learn(batch, [((i % 4) - 1.5) for i in range(len(batch.records))], 2)
    new = ray.get(d.weights.weights_ref)
    one.load_weights(new, d.version)

    def members_hold(state):  # each member exactly its shard of `state`
        return ray.get([s.weights_hash.remote() for s in d.rollouts.samplers]) == [state_hash(expert_shard_state(state, r, 2)) for r in range(2)]
    assert members_hold(new)
    assert members[0] != state_hash(expert_shard_state(new, 0, 2))  # the update reached them
    parts = ray.get(d.weights.sampler_weights)
    assert all(t.shape[0] == E // 2 for part in parts for k, t in part.items() if ".experts.w" in k)  # shards travel, not the whole
    same_as_one_sampler(3)
    old_members = list(d.rollouts.samplers)
    same_as_one_sampler(4, kill=1)
    assert d.rollouts.restarts == 1 and not set(d.rollouts.samplers) & set(old_members) and members_hold(new)
    batch = d.collect(d.sample_step(5), 5)  # the new members sample the current version, and the next sync reaches them
    d.learn(batch, [((i % 4) - 1.5) for i in range(len(batch.records))], 5)
    assert {rec.version for rec in batch.records} == {d.version - 1} and members_hold(ray.get(d.weights.weights_ref))
    d.close()
    tracker.close()


@pytest.mark.ray
def test_collective_weight_sync_and_recovery_from_a_dead_sampler(policy_dir, ray_session, tmp_path):
    """`grpo.weight_sync=collective` (gloo here, NCCL on GPUs): after an update both samplers hold the
    learner's weights bit for bit, loaded by the broadcast; a sampler killed between steps misses the
    next broadcast and loads that version from the object store, and the sync after that is a
    broadcast again, over a new group."""
    ray = ray_session
    cfg = make_cfg(policy_dir, "rollout.num_samplers=2", "grpo.lr=1e-2", "grpo.weight_sync=collective", "grpo.sync_timeout_s=20")
    d, tracker = driver_for(cfg, tmp_path)
    assert d.weights.collective and d.weights.ready

    def update(step):
        batch = d.collect(d.sample_step(step), step)
        adv = [((i % 4) - 1.5) for i in range(len(batch.records))]
        m = d.learn(batch, adv, step)
        learner = ray.get(d.learners[0].weights_hash.remote())
        assert ray.get([s.weights_hash.remote() for s in d.rollouts.samplers]) == [learner, learner]
        return m, learner

    m1, h1 = update(1)
    assert m1["weight_sync/collective"] == 1.0 and m1["weight_sync/fallbacks"] == 0
    loads = ray.get([s.__ray_call__.remote(lambda self: self.loads) for s in d.rollouts.samplers])
    assert loads == [1, 1]  # by the broadcast

    pid = ray.get(d.rollouts.samplers[1].__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    m2, h2 = update(2)  # the restarted sampler missed the broadcast: object store
    assert h2 != h1 and m2["weight_sync/fallbacks"] == 1 and m2["weight_sync/collective"] == 0.0
    m3, _ = update(3)  # a new group, a broadcast again
    assert m3["weight_sync/collective"] == 1.0 and m3["weight_sync/fallbacks"] == 1 and d.weights.groups == 2
    d.close()
    tracker.close()


@pytest.mark.ray
def test_killed_sampler_and_evaluator_restart_and_score_every_prompt_once(policy_dir, ray_session, tmp_path):
    cfg = make_cfg(policy_dir, "rollout.max_new_tokens=64")
    d, tracker = driver_for(cfg, tmp_path)
    ray = ray_session
    pids = [ray.get(d.rollouts.samplers[0].__ray_call__.remote(lambda self: os.getpid())),
            ray.get(d.rollouts.scorers[0].__ray_call__.remote(lambda self: os.getpid()))]
    pending = d.sample_step(1)
    for pid in pids:  # both die with the step's calls queued or running on them
        os.kill(pid, signal.SIGKILL)
    batch = d.collect(pending, 1)
    records = batch.records
    by_group = {}
    for rec in records:
        by_group.setdefault(rec.group, []).append(rec.id)
    assert sorted(by_group) == list(range(cfg.grpo.prompts_per_step))
    assert all(len(ids) == cfg.grpo.group_size and len(set(ids)) == 1 for ids in by_group.values())
    assert len({ids[0] for ids in by_group.values()}) == cfg.grpo.prompts_per_step  # distinct prompts
    new = [ray.get(d.rollouts.samplers[0].__ray_call__.remote(lambda self: os.getpid())),
           ray.get(d.rollouts.scorers[0].__ray_call__.remote(lambda self: os.getpid()))]
    assert new[0] != pids[0] and new[1] != pids[1]
    d.close()
    tracker.close()


@pytest.mark.ray
def test_reference_actor_gives_the_kl_of_the_colocated_reference(policy_dir, ray_session, tmp_path):
    """Same rollouts, same updates: the KL and loss with the reference in its own actor equal those
    with a reference copy inside the learner (1e-5), and the KL is non-zero once the policy moved.
    Two ZeRO-3 learners hold half the colocated reference each (partitioned, gathered layer by layer
    for its forward) and give the KL and loss of two ZeRO-2 learners holding a whole copy each."""
    ray, out = ray_session, {}
    for where, extra in (("colocated", []), ("actor", []), ("zero3", ["grpo.learners=2", "grpo.zero_stage=3"]),
                         ("zero2", ["grpo.learners=2", "grpo.zero_stage=2"])):
        where_ref = f"grpo.reference={'actor' if where == 'actor' else 'colocated'}"
        d, tracker = driver_for(make_cfg(policy_dir, "grpo.kl_beta=0.5", where_ref, "grpo.lr=1e-2", *extra), tmp_path / where)
        assert (d.reference is not None) == (where == "actor")
        if where == "zero3":  # a half each (small parameters are kept whole)
            held = ray.get([l.held_bytes.remote() for l in d.learners])
            whole = 4 * sum(q.numel() for q in load_policy(policy_dir[0] / "hf").parameters())
            assert all(h["reference"] < 0.6 * whole for h in held), (held, whole)
        batch = d.collect(d.sample_step(1), 1)
        adv = [((i % 4) - 1.5) for i in range(len(batch.records))]
        out[where] = (d.learn(batch, adv, 1), d.learn(batch, adv, 2))  # the second: the policy has moved away from the reference
        d.close()
        tracker.close()
    (c1, c2), (_, a2), (z1, z2), (_, w2) = out["colocated"], out["actor"], out["zero3"], out["zero2"]
    assert c1["train/kl"] == pytest.approx(0.0, abs=1e-7) and c2["train/kl"] > 1e-6
    assert z1["train/kl"] == pytest.approx(0.0, abs=1e-7) and z2["train/kl"] > 1e-6
    for key in ("train/kl", "train/loss"):
        assert a2[key] == pytest.approx(c2[key], rel=1e-5, abs=1e-8), key
        # two ZeRO-2 learners with a whole reference each: the same policy update (to reduction order), the same KL
        assert z2[key] == pytest.approx(w2[key], rel=1e-3, abs=1e-7), key


@pytest.mark.ray
def test_two_learners_with_zero2_make_the_update_of_one(policy_dir, ray_session, tmp_path):
    """The same rollouts and advantages through 1 learner and through 2 (ZeRO-2, each rank half the
    samples, token-mean rescaled over the group), and through 2 that own half the routed experts
    each (grpo.expert_parallel=2, issue 21): the same update, to 0.1% of its norm (measured 1e-5).
    Adam divides by the gradient's magnitude, which amplifies reduction-order rounding where
    gradients are tiny (single entries up to 7e-5 apart on a 1e-2 step); an update computed from the wrong
    samples on either rank would differ by a large part of its norm. The expert-parallel run's
    checkpoint reassembles (checkpoints.load_model_state, what `sputnik export` reads) to the state
    the samplers got. A second step with a single sample left gives one learner's update too."""
    from orchestrator.checkpoints import find_checkpoints, load_model_state

    ray = ray_session
    out = {}
    for name, over in {"one": ["grpo.learners=1"], "zero2": ["grpo.learners=2"], "ep2": ["grpo.learners=2", "grpo.expert_parallel=2"]}.items():
        cfg = make_cfg(policy_dir, *over, "grpo.zero_stage=2", "grpo.lr=1e-2")
        d, tracker = driver_for(cfg, tmp_path / name)
        batch = d.collect(d.sample_step(1), 1)
        adv = [((i % 4) - 1.5) for i in range(len(batch.records))]
        m = d.learn(batch, adv, 1)
        out[name] = (m, ray.get(d.weights.weights_ref), ray.get(batch.gen))
        if name == "ep2":
            d.save(1)
            saved = load_model_state(find_checkpoints(tmp_path / name)[-1])
            assert saved.keys() == out[name][1].keys()
            assert all(torch.equal(saved[k], v) for k, v in out[name][1].items())
            assert ray.get([l.weights_hash.remote() for l in d.learners])[0] is not None
        # one sample left (fewer than ranks): the other rank runs every collective on a weightless row
        single = [a if i == next(i for i, ids in enumerate(out[name][2][0].completion_ids) if ids) else None for i, a in enumerate(adv)]
        out[name] += (d.learn(batch, single, 2), ray.get(d.weights.weights_ref))
        d.close()
        tracker.close()
    from model.hf import from_hf_pretrained

    for name in ("zero2", "ep2"):  # the second update from the first's weights: the same single-sample step
        update = torch.cat([(out["one"][4][k] - out["one"][1][k]).flatten() for k in out["one"][1]]).norm()
        diff = torch.cat([(out["one"][4][k] - out[name][4][k]).flatten() for k in out["one"][1]]).norm()
        assert update > 1e-3 and diff <= 1e-3 * update and out[name][3]["train/loss"] == pytest.approx(out["one"][3]["train/loss"], rel=1e-4)
    (m1, w1, g1, *_) = out["one"]
    init = from_hf_pretrained(policy_dir[0] / "hf").state_dict()
    update = torch.cat([(w1[k] - init[k]).flatten() for k in w1]).norm()
    assert update > 1e-2  # the update did something
    for name in ("zero2", "ep2"):
        m2, w2, g2, *_ = out[name]
        assert [c.completion_ids for c in g1] == [c.completion_ids for c in g2]  # same rollouts
        assert w2.keys() == w1.keys()
        diff = torch.cat([(w1[k] - w2[k]).flatten() for k in w1]).norm()
        assert diff <= 1e-3 * update, (name, float(diff), float(update))
        assert abs(m2["train/grad_norm"] - m1["train/grad_norm"]) <= 1e-4 * m1["train/grad_norm"], name  # the experts' norm included


@pytest.mark.ray
@pytest.mark.parametrize("saved,resumed", [(["grpo.learners=2", "grpo.zero_stage=2"], ["grpo.learners=1", "grpo.zero_stage=2"]),
                                           (["grpo.learners=1", "grpo.zero_stage=0"], ["grpo.learners=2", "grpo.zero_stage=3"]),
                                           (["grpo.learners=2", "grpo.zero_stage=2", "grpo.expert_parallel=2"], ["grpo.learners=1", "grpo.zero_stage=2"])],
                         ids=["2xZeRO2-to-1", "1xZeRO0-to-2xZeRO3", "2xEP2-to-1"])
def test_a_grpo_checkpoint_resumes_resharded_with_other_learners(policy_dir, ray_session, tmp_path, saved, resumed):
    """Learners saved at one count, ZeRO stage or expert layout, resumed at another (orchestrator/reshard.py): the
    resumed policy is the saved one bit for bit, and its next update on the same rollouts is the
    update the saved learners make (to 0.1% of its norm, as 2 learners against 1), which needs
    AdamW's moments and step count back: a fresh optimizer's first step is several times larger."""
    ray = ray_session
    fixed = ["grpo.lr=1e-2", "grpo.checkpoint_every=100"]
    d, tracker = driver_for(make_cfg(policy_dir, *saved, *fixed), tmp_path)
    d.learn(d.collect(d.sample_step(1), 1), [((i % 4) - 1.5) for i in range(16)], 1)
    d.save(1)
    w1 = ray.get(d.weights.weights_ref)
    batch = d.collect(d.sample_step(2), 2)
    adv = [((i % 3) - 1.0) for i in range(len(batch.records))]
    d.learn(batch, adv, 2)
    want, gen = ray.get(d.weights.weights_ref), [c.completion_ids for c in ray.get(batch.gen)]
    d.close()
    tracker.close()

    d, tracker = driver_for(make_cfg(policy_dir, *resumed, *fixed), tmp_path)  # the same run directory
    try:
        assert d.resume() == 1 and d.version == 1
        got1 = ray.get(d.weights.weights_ref)
        assert all(torch.equal(got1[k], w1[k]) for k in w1)
        batch = d.collect(d.sample_step(2), 2)
        assert [c.completion_ids for c in ray.get(batch.gen)] == gen  # the same rollouts from the same policy
        d.learn(batch, adv, 2)
        got = ray.get(d.weights.weights_ref)
    finally:
        d.close()
        tracker.close()
    update = torch.cat([(want[k] - w1[k]).flatten() for k in w1]).norm()
    diff = torch.cat([(got[k] - want[k]).flatten() for k in w1]).norm()
    assert update > 1e-3 and diff <= 1e-3 * update, (float(diff), float(update))


@pytest.mark.ray
def test_dynamic_sampling_drops_zero_variance_groups(policy_dir, ray_session, tmp_path):
    from rl.grpo import zero_variance_groups

    cfg = make_cfg(policy_dir, "grpo.dynamic_sampling=true", "grpo.max_refill_rounds=1")
    d, tracker = driver_for(cfg, tmp_path)
    batch = d.collect(d.sample_step(1), 1)
    adv, m = d.advantages(batch.records)
    records = batch.records
    groups = sorted({r.group for r in records})
    rewards = torch.tensor([[r.reward for r in records if r.group == g] for g in groups])
    zero = zero_variance_groups(rewards)
    assert batch.refill_rounds == (1 if int((~zero[:4]).sum()) < 4 else 0)
    for g, z in zip(groups, zero.tolist()):
        vals = [a for a, r in zip(adv, records) if r.group == g]
        assert all(v is None for v in vals) if z else all(v is not None for v in vals)
    d.close()
    tracker.close()


@pytest.mark.ray
def test_log_every_and_reward_errors_of_the_step(policy_dir, ray_session, tmp_path, capsys):
    """`tracking.log_every=2` over 3 steps logs steps 2 and 3 (the last) with a progress line each;
    a reward that always raises counts, per logged step, one error per completion of that step
    over both reward workers (not a worker's lifetime total)."""
    boom = tmp_path / "boom.py"
    boom.write_text("def boom(completion, sample):\n    raise RuntimeError('always')\n")
    cfg = make_cfg(policy_dir, "grpo.steps=3", "grpo.eval_every=100", "grpo.checkpoint_every=100", "tracking.log_every=2",
                   "grpo.num_evaluators=2", f'rewards.rewards=[{{"name": "math_accuracy"}}, {{"name": "{boom}:boom"}}]')
    d, tracker = driver_for(cfg, tmp_path / "run")
    d.run()
    d.close()
    tracker.close()
    errors = per_step(tmp_path / "run", "reward/errors")
    per_completion = cfg.grpo.prompts_per_step * cfg.grpo.group_size
    assert errors == {2: per_completion, 3: per_completion}
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("grpo: step ")]
    assert [l.split()[2] for l in lines] == ["2/3", "3/3"] and all("tok/s" in l and "eta" in l for l in lines)


def sputnik(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def per_step(run_dir: Path, key: str) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            out[rec["step"]] = rec[key]
    return out


def grpo_args(policy_dir) -> list[str]:
    root, _ = policy_dir
    return ["grpo", f"grpo.init={root / 'hf'}", f"grpo.tokenizer={root / 'tokenizer.json'}", "grpo.prompts_per_step=4",
            "grpo.group_size=4", "grpo.heldout_size=4", "grpo.train_size=64", "rollout.max_new_tokens=24",
            "tracking.wandb_mode=disabled", "cluster.num_cpus=2", "grpo.steps=4", "grpo.checkpoint_every=2", "grpo.lr=1e-2"]


def assert_same_steps(a_dir: Path, b_dir: Path, steps: list[int]) -> None:
    for key in ("reward/mean", "rollout/response_length/mean", "train/loss"):
        a, b = per_step(a_dir, key), per_step(b_dir, key)
        assert sorted(a) == sorted(b) == steps
        for step in a:
            assert abs(a[step] - b[step]) <= 1e-6 * max(1.0, abs(a[step])), (key, step, a[step], b[step])


@pytest.mark.slow
@pytest.mark.ray
def test_resume_repeats_the_uninterrupted_run(policy_dir, straight_run, tmp_path):
    common = grpo_args(policy_dir)
    sputnik(*common, "grpo.stop_after=3", "--out", str(tmp_path / "resumed"))  # checkpoints at steps 2 and 3
    damaged = next((tmp_path / "resumed" / "checkpoints" / "learners" / "step000003").glob("*model_states.pt"))
    damaged.write_bytes(damaged.read_bytes()[:1000])  # a save cut short: step 3 does not load
    r = sputnik(*common, "--out", str(tmp_path / "resumed"))
    out = r.stdout + r.stderr
    assert "step000003 does not load, skipped" in out and "resumed from step 2" in out
    assert_same_steps(straight_run, tmp_path / "resumed", [1, 2, 3, 4])


def test_grpo_without_init_is_a_config_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "grpo", "--out", str(tmp_path / "x")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "grpo.init" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("reward, message", [("math_acuracy", "unknown reward 'math_acuracy'"),
                                             ("{dir}/missing.py:f", "missing.py does not exist"),
                                             ("{dir}/r.py:nope", "defines no function 'nope'")])
def test_a_bad_reward_is_refused_before_ray_starts(policy_dir, tmp_path, reward, message):
    (tmp_path / "r.py").write_text("def score(completion, sample):\n    return 1.0\n")
    root, _ = policy_dir
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "grpo", f"grpo.init={root / 'hf'}", f"grpo.tokenizer={root / 'tokenizer.json'}",
                        f'rewards.rewards=[{{"name": "{reward.format(dir=tmp_path)}"}}]', "--out", str(tmp_path / "x")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr and "rewards.rewards.0.name" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Ray" not in r.stdout + r.stderr


def test_quiet_teardown_hook_hides_only_the_intended_exit():
    # An exception Python cannot raise (here from __del__) goes to sys.unraisablehook: the role
    # actors' hook drops the SystemExit of Ray's SIGTERM teardown and still reports anything else.
    code = (
        "import sys\n"
        "from orchestrator.grpo.rollout import quiet_teardown_hook\n"
        "sys.unraisablehook = quiet_teardown_hook\n"
        "class Exit:\n"
        "    def __del__(self): raise SystemExit(1)\n"
        "class Bug:\n"
        "    def __del__(self): raise ValueError('a real bug')\n"
        "Exit(); Bug()\n"
        "print('still running')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0 and "still running" in r.stdout
    assert "SystemExit" not in r.stderr
    assert "ValueError: a real bug" in r.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_sigterm_flushes_the_run_and_a_resubmission_resumes_it(policy_dir, tmp_path):
    """What `ray job stop` does (SIGTERM to the entrypoint) after step 3. (It signals the whole
    process group; here that group would also hold the local Ray that `sputnik grpo` started, which
    a job's cluster is not, so only the driver is signalled. The W&B follower is outside the group
    either way.) exit 143 with one line; the W&B run, finished by its detached follower,
    holds every step of metrics.jsonl, the rollouts table and the histograms; the same command again
    resumes from the step-2 checkpoint, continues the same W&B run, and metrics.jsonl and W&B end
    with one record per step."""
    from orchestrator.tracking import wait_follower
    from orchestrator.wandb_offline import offline_history

    root, _ = policy_dir
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "orchestrator.cli", "grpo", f"grpo.init={root / 'hf'}", f"grpo.tokenizer={root / 'tokenizer.json'}",
           "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.heldout_size=4", "grpo.train_size=64", "rollout.max_new_tokens=24",
           "tracking.wandb_mode=offline", "cluster.num_cpus=2", "grpo.steps=6", "grpo.checkpoint_every=2", "grpo.eval_every=100",
           "grpo.table_every=2", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        for line in p.stdout:
            if line.startswith("grpo: step 3/6"):
                p.send_signal(signal.SIGTERM)
                break
        _, err = p.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 143 and "stopped (SIGTERM)" in err, err[-2000:]
    assert wait_follower(out, 60), (out / "wandb-follower.log").read_text()

    def steps_and_history():
        records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in records], offline_history(out), records

    steps, history, records = steps_and_history()
    assert steps[:4] == [0, 1, 2, 3] and [h["_step"] for h in history] == steps  # every step written, once
    assert all(h["reward/mean"] == r["reward/mean"] for h, r in zip(history[1:], records[1:]))
    # W&B's history flattens a media object into its fields: a table is "rollouts/_type" == "table-file"
    tabled = [h["_step"] for h in history if h.get("rollouts/_type") == "table-file"]
    assert tabled == [1, 2], history
    assert all(h.get("rollout/response_length/_type") == "histogram" for h in history if h["_step"] in tabled), history
    run_id = (out / "wandb-run-id").read_text().strip()
    r = sputnik(*cmd[3:])
    assert "resumed from step" in r.stdout + r.stderr
    assert wait_follower(out, 60), (out / "wandb-follower.log").read_text()
    steps, history, _ = steps_and_history()
    assert steps == [h["_step"] for h in history] == list(range(7)), (steps, [h["_step"] for h in history])
    assert [h["_step"] for h in history if h.get("rollouts/_type") == "table-file"] == [1, 2, 4, 6]
    assert (out / "wandb-run-id").read_text().strip() == run_id
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) >= 2  # the same W&B run, continued
