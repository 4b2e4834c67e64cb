"""GRPO on a multi-node Ray cluster simulated on this machine (ray.cluster_utils.Cluster, every
node on 127.0.0.1): the roles land in their placement groups across nodes (samplers and
evaluators spread, as `make_plan` plans them), and removing a node that hosts a sampler in the
middle of a step loses nothing: the sampler restarts on another node, the step completes with
every prompt scored exactly once, and the next step samples with the updated policy."""

import time

import pytest

from orchestrator.placement import live_nodes, make_plan, roles_for


def node_of(ray, actor):
    return ray.get(actor.__ray_call__.remote(lambda self: __import__("ray").get_runtime_context().get_node_id()))


def check_every_prompt_scored_once(batch, cfg):
    records = batch.records
    by_group = {}
    for rec in records:
        by_group.setdefault(rec.group, []).append(rec.id)
    assert sorted(by_group) == list(range(cfg.grpo.prompts_per_step))
    assert all(len(ids) == cfg.grpo.group_size and len(set(ids)) == 1 for ids in by_group.values())
    return records


@pytest.mark.slow
@pytest.mark.ray
def test_roles_spread_over_nodes_and_a_lost_sampler_node_is_recovered(policy_dir, tmp_path, monkeypatch):
    import ray
    import ray._private.ray_constants as ray_constants
    from ray.cluster_utils import Cluster

    # Every node and the driver stay on loopback: Ray otherwise rewrites 127.0.0.1 in a cluster
    # address to the machine's routable IP (its own switch for single-machine clusters).
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)

    from orchestrator.config import load_config
    from orchestrator.grpo import Driver
    from orchestrator.ray_local import init_ray
    from orchestrator.tracking import Tracker

    local = dict(node_ip_address="127.0.0.1", include_dashboard=False)
    cluster = Cluster(initialize_head=True, head_node_args={**local, "num_cpus": 0})  # the driver's node runs no role
    workers = {cluster.add_node(**local, num_cpus=2).node_id: None for _ in range(3)}
    cluster.wait_for_nodes()
    root, _ = policy_dir
    cfg = load_config(None, [
        f"grpo.init={root / 'hf'}", f"grpo.tokenizer={root / 'tokenizer.json'}", "grpo.prompts_per_step=4",
        "grpo.group_size=4", "grpo.heldout_size=4", "grpo.train_size=64", "rollout.max_new_tokens=48", "grpo.lr=1e-2",
        "rollout.num_samplers=2", "grpo.num_evaluators=2", "tracking.wandb_mode=disabled",
        f"cluster.address={cluster.address}", "cluster.placement_timeout_s=120",
    ])
    try:
        init_ray(cfg.cluster)
        plan = make_plan(roles_for(cfg, "grpo", 0), live_nodes(ray))
        tracker = Tracker(tmp_path, cfg.tracking, name="multinode")
        d = Driver(cfg, tmp_path, tracker)
        samplers = [node_of(ray, s) for s in d.rollouts.samplers]
        scorers = [node_of(ray, s) for s in d.rollouts.scorers]
        learner = node_of(ray, d.learners[0])
        assert set(samplers + scorers + [learner]) <= set(workers)  # the 0-CPU head runs no role
        # as planned: at most one sampler and one evaluator per node
        for role, placed in (("sampler", samplers), ("evaluator", scorers)):
            assert len(set(placed)) == len(placed) == max(1, len(set(plan.nodes_of(role)))), (role, placed)

        # A node with a sampler but not the learner dies while the step is generating.
        victim = next(n for n in samplers if n != learner)
        node = next(n for n in cluster.worker_nodes if n.node_id == victim)
        pending = d.sample_step(1)
        cluster.remove_node(node, allow_graceful=False)
        # Ray declares the node dead after its missed health checks; until then the killed node's
        # actors look alive to the driver (seen under load).
        deadline = time.monotonic() + 120
        while any(n["NodeID"] == victim and n["Alive"] for n in ray.nodes()):
            assert time.monotonic() < deadline, "Ray never declared the removed node dead"
            time.sleep(0.5)
        batch = d.collect(pending, 1)
        check_every_prompt_scored_once(batch, cfg)
        moved = [node_of(ray, s) for s in d.rollouts.samplers]
        assert victim not in moved and all(n in workers for n in moved)

        adv, _ = d.advantages(batch.records)
        adv = [((i % 4) - 1.5) for i in range(len(adv))]  # a learning signal even if all rewards are equal
        d.learn(batch, adv, 1)
        learner_hash = ray.get(d.learners[0].weights_hash.remote())
        assert ray.get([s.weights_hash.remote() for s in d.rollouts.samplers]) == [learner_hash] * 2
        batch = d.collect(d.sample_step(2), 2)
        records = check_every_prompt_scored_once(batch, cfg)
        assert {rec.version for rec in records} == {1}
        d.close()
        tracker.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
