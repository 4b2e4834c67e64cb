"""Placement planning: PACK fills a node before the next, SPREAD balances, impossible plans are
refused with the reason; `sputnik plan` prints the plan; node-local storage is refused on a
cluster that spans hosts (filesystem types checked against util-linux's findmnt)."""

import os
import re
import shutil
import time
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.placement import Node, PlanError, Role, filesystem_type, make_plan, roles_for, storage_problem

REPO = Path(__file__).resolve().parents[2]


def nodes(n, cpus, gpus):
    return [Node(cpus, gpus, f"n{i}") for i in range(n)]


def test_learners_pack_node_by_node_and_samplers_spread_over_the_rest():
    roles = [Role("learner", 12, 4, 1, "PACK"), Role("sampler", 8, 2, 1, "SPREAD"), Role("evaluator", 8, 1, 0, "SPREAD")]
    plan = make_plan(roles, nodes(4, 96, 8))
    assert plan.nodes_of("learner") == [0] * 8 + [1] * 4  # a full node, then the next
    per_node = Counter(plan.nodes_of("sampler"))
    # 8 GPUs left on nodes 2 and 3, 4 on node 1: the samplers balance over the nodes with room
    assert sum(per_node.values()) == 8 and max(per_node.values()) - min(per_node.values()) <= 1
    assert set(per_node) == {1, 2, 3}
    assert Counter(plan.nodes_of("evaluator")) == {0: 2, 1: 2, 2: 2, 3: 2}
    for i, node in enumerate(plan.nodes):  # never over a node's capacity
        gpus = sum(r.gpus for r in roles for n in plan.nodes_of(r.name) if n == i)
        cpus = sum(r.cpus for r in roles for n in plan.nodes_of(r.name) if n == i)
        assert gpus <= node.gpus and cpus <= node.cpus


def test_expert_parallel_sampler_groups_share_a_node_and_spread_as_groups_or_span_where_none_holds_one():
    roles = [Role("learner", 4, 4, 1, "PACK"), Role("sampler", 8, 2, 1, "SPREAD", group=4)]
    plan = make_plan(roles, nodes(3, 96, 8))
    got = plan.nodes_of("sampler")
    assert plan.nodes_of("learner") == [0] * 4 and got[:4] == [got[0]] * 4 and got[4:] == [got[4]] * 4 and got[0] != got[4]
    assert {got[0], got[4]} == {1, 2}  # the two empty nodes, not next to the learners
    # a group larger than every node spans the fewest nodes, each filled (a 671B policy: groups of 16 on 8-GPU nodes)
    assert sorted(Counter(make_plan([Role("sampler", 4, 2, 1, "SPREAD", group=4)], nodes(4, 96, 2)).nodes_of("sampler")).values()) == [2, 2]
    wide_plan = make_plan([Role("learner", 8, 4, 1, "PACK"), Role("sampler", 32, 4, 1, "SPREAD", group=16)], nodes(5, 96, 8))
    wide = wide_plan.nodes_of("sampler")
    assert wide_plan.grouping(wide_plan.roles[1]) == ", in groups of 16 spanning up to 2 nodes each"
    assert plan.grouping(roles[1]) == ", in groups of 4 on one node each" and plan.grouping(roles[0]) == ""
    assert [sorted(Counter(wide[:16]).values()), sorted(Counter(wide[16:]).values())] == [[8, 8], [8, 8]]
    assert 0 not in wide and not set(wide[:16]) & set(wide[16:])  # not beside the learners; the groups on nodes of their own
    with pytest.raises(PlanError, match=r"sampler group 1 of 1 \(4 x 1 CPU \+ 1 GPU, spanning nodes\) fits on no set of nodes"):
        make_plan([Role("learner", 1, 3.5, 0, "PACK"), Role("sampler", 4, 1, 1, "SPREAD", group=4)], nodes(2, 4, 3))
    with pytest.raises(PlanError, match=r"sampler group 2 of 2 \(4 x 2 CPU \+ 1 GPU\) fits on no node after placing"):
        make_plan([Role("learner", 2, 4, 1, "PACK"), Role("sampler", 8, 2, 1, "SPREAD", group=4)], nodes(2, 96, 5))
    cfg = load_config(None, ["rollout.num_samplers=8", "rollout.expert_parallel=4"])
    assert next(r for r in roles_for(cfg, "grpo", 8) if r.name == "sampler").group == 4


def test_impossible_plans_name_the_reason():
    with pytest.raises(PlanError, match=r"need 40 GPUs .* has 32"):
        make_plan([Role("learner", 32, 1, 1, "PACK"), Role("sampler", 8, 1, 1, "SPREAD")], nodes(4, 64, 8))
    with pytest.raises(PlanError, match=r"one sampler needs 1 CPU \+ 2 GPU, but the largest node has 8 CPU \+ 1 GPU"):
        make_plan([Role("sampler", 1, 1, 2, "SPREAD")], nodes(2, 8, 1))
    # enough CPU in total (1.8 of 2) but 0.6-CPU bundles do not pack two to a 1-CPU node
    with pytest.raises(PlanError, match=r"learner 3 of 3 .* fits on no node"):
        make_plan([Role("learner", 3, 0.6, 0, "PACK")], nodes(2, 1, 0))


def test_roles_of_a_config_follow_its_counts_and_auto_gpus():
    cfg = load_config(REPO / "configs" / "grpo_math.yaml", ["grpo.learners=4", "rollout.num_samplers=3", "grpo.num_evaluators=2"])
    gpu = {r.name: (r.count, r.gpus, r.strategy) for r in roles_for(cfg, "grpo", cluster_gpus=16)}
    assert gpu == {"learner": (4, 1.0, "PACK"), "sampler": (3, 1.0, "SPREAD"), "evaluator": (2, 0.0, "SPREAD")}
    cpu = {r.name: r.gpus for r in roles_for(cfg, "grpo", cluster_gpus=0)}
    assert cpu == {"learner": 0.0, "sampler": 0.0, "evaluator": 0.0}
    assert [r.name for r in roles_for(cfg, "eval", 0)] == ["sampler", "evaluator"]
    pre = roles_for(load_config(REPO / "configs" / "pretrain_tiny.yaml", ["cluster.gpus_per_learner=0"]), "pretrain", 8)
    assert [(r.name, r.gpus) for r in pre] == [("pretrain worker", 0.0)]


def sputnik(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_sputnik_plan_prints_the_plan_and_refuses_an_impossible_one():
    r = sputnik("plan", "--nodes", "4", "--gpus-per-node", "8", "grpo.learners=8", "rollout.num_samplers=6")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("node") and line.split()[0] != "node"]
    assert len(rows) == 4
    learners = [int(row[3]) for row in rows]
    samplers = [int(row[4]) for row in rows]
    assert learners == [8, 0, 0, 0] and samplers == [0, 2, 2, 2]
    r = sputnik("plan", "--nodes", "1", "--gpus-per-node", "8", "grpo.learners=8", "rollout.num_samplers=6")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "need 14 GPUs" in r.stderr and "has 8" in r.stderr


@pytest.mark.skipif(shutil.which("findmnt") is None, reason="needs util-linux findmnt")
@pytest.mark.parametrize("path", ["/", "/proc", "/tmp", str(REPO)])
def test_filesystem_type_matches_findmnt(path):
    ref = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", path], capture_output=True, text=True).stdout.strip()
    assert filesystem_type(path) == ref


def test_node_local_storage_is_refused_on_a_multi_host_cluster():
    two = {"10.0.0.1", "10.0.0.2"}
    problem = storage_problem("/home/me/runs/x", two, "ext4")
    assert problem and "node-local filesystem (ext4)" in problem and "2 hosts" in problem
    assert storage_problem("/home/me/runs/x", {"127.0.0.1"}, "ext4") is None  # one machine sees its own disk
    assert storage_problem("/mnt/shared/runs/x", two, "nfs4") is None
    assert storage_problem("/mnt/fsx/runs/x", two, "lustre") is None
    assert storage_problem("s3://bucket/runs/x", two, "") is None


def plan_table_shapes(stdout: str, roles: list[str]) -> dict[str, list[int]]:
    """Per role, the instance counts per node (largest first) from the table `sputnik plan` prints:
    a header ("node  CPU  GPU  <role>...  CPU used  GPU used"), a dashed line, one row per node."""
    lines = stdout.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("node ") and set(lines[k + 1]) <= {"-", " "})
    head = re.split(r"\s{2,}", lines[i].strip())
    rows = []
    for line in lines[i + 2:]:
        if not line.strip():
            break
        rows.append(line.split())
    return {role: sorted((int(r[head.index(role)]) for r in rows if int(r[head.index(role)])), reverse=True) for role in roles}


@pytest.mark.slow
@pytest.mark.ray
def test_live_placement_is_the_plan_and_an_impossible_one_fails_at_once(tmp_path, monkeypatch):
    """On a simulated cluster (a 0-CPU head and three 2-CPU nodes, all on 127.0.0.1) the role
    instances land as `sputnik plan --node 0 --node 2 --node 2 --node 2` plans them (how many
    share a node, per role), and a placement no node can hold is refused at once with the reason,
    by GRPO's RolePlacement and by pretraining before its workers start, although
    cluster.placement_timeout_s is 600 s. Expert-parallel sampler groups share a node, or span
    nodes where they are larger than every node."""
    import ray
    import ray._private.ray_constants as ray_constants
    from ray.cluster_utils import Cluster

    from orchestrator import pretrain
    from orchestrator.placement import RolePlacement, live_nodes
    from orchestrator.ray_local import init_ray

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every node stays on loopback
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    local = dict(node_ip_address="127.0.0.1", include_dashboard=False)
    cluster = Cluster(initialize_head=True, head_node_args={**local, "num_cpus": 0})
    for _ in range(3):
        cluster.add_node(**local, num_cpus=2)
    cluster.wait_for_nodes()
    counts = ["grpo.learners=2", "cluster.cpus_per_learner=1", "rollout.num_samplers=3", "grpo.num_evaluators=3"]
    cfg = load_config(REPO / "configs" / "grpo_math.yaml", [*counts, f"cluster.address={cluster.address}"])
    try:
        init_ray(cfg.cluster)
        assert sorted((n.cpus, n.gpus) for n in live_nodes(ray)) == [(0, 0), (2, 0), (2, 0), (2, 0)]
        roles = roles_for(cfg, "grpo", 0)
        r = sputnik("plan", "--node", "0", "--node", "2", "--node", "2", "--node", "2", *counts)
        assert r.returncode == 0, r.stderr
        planned = plan_table_shapes(r.stdout, [role.name for role in roles])
        assert planned == {"learner": [2], "sampler": [2, 1], "evaluator": [2, 1]}, r.stdout

        placement = RolePlacement(ray, roles, autoscaling=False, timeout_s=60)
        where = ray.remote(lambda: ray.get_runtime_context().get_node_id())
        try:
            live = {role.name: Counter(ray.get([where.options(**placement.options(role.name, i)).remote() for i in range(role.count)]))
                    for role in roles}
        finally:
            placement.close()
        assert {name: sorted(c.values(), reverse=True) for name, c in live.items()} == planned
        assert placement.plan is not None and all(placement.plan.shape(n) == planned[n] for n in planned)

        def sampler_nodes(k):  # 4 samplers of 1 CPU in groups of k, placed live: (learner's node, each member's node, plan)
            ep = roles_for(load_config(REPO / "configs" / "grpo_math.yaml", ["rollout.num_samplers=4", f"rollout.expert_parallel={k}",
                                                                              "cluster.cpus_per_sampler=1", "grpo.num_evaluators=1"]), "grpo", 0)
            placement = RolePlacement(ray, ep, autoscaling=False, timeout_s=60)
            try:
                return (ray.get(where.options(**placement.options("learner", 0)).remote()),
                        ray.get([where.options(**placement.options("sampler", i)).remote() for i in range(4)]), placement.plan)
            finally:
                placement.close()

        # expert-parallel samplers: each group of 2 on one node, the learners' node too full for a
        # group; SPREAD alone would put a member beside the learners
        learner_node, members, _ = sampler_nodes(2)
        assert members[0] == members[1] != members[2] == members[3] and learner_node not in members, (learner_node, members)
        # a group of 4 is larger than every 2-CPU node: it spans the two nodes the learner leaves free
        learner_node, members, plan = sampler_nodes(4)
        assert sorted(Counter(members).values()) == [2, 2] and learner_node not in members, (learner_node, members)
        assert plan.shape("sampler") == [2, 2]

        bad = roles_for(load_config(REPO / "configs" / "grpo_math.yaml", ["cluster.cpus_per_sampler=3"]), "grpo", 0)
        t0 = time.monotonic()
        with pytest.raises(PlanError, match=r"one sampler needs 3 CPU, but the largest node has 2 CPU"):
            RolePlacement(ray, bad, autoscaling=False, timeout_s=600)
        pre = load_config(REPO / "configs" / "pretrain_tiny.yaml", ["pretrain.workers=4", "cluster.cpus_per_learner=1.5",
                                                                      f"cluster.address={cluster.address}"])
        with pytest.raises(PlanError, match=r"pretrain worker 4 of 4 \(1.5 CPU\) fits on no node"):
            pretrain.fit(pre, tmp_path, tmp_path, None)
        assert time.monotonic() - t0 < 30  # not placement_timeout_s
        r = sputnik("plan", "--config", str(REPO / "configs" / "pretrain_tiny.yaml"), "--node", "0", "--node", "2",
                    "--node", "2", "--node", "2", "pretrain.workers=4", "cluster.cpus_per_learner=1.5")
        assert r.returncode == 2 and "pretrain worker 4 of 4 (1.5 CPU) fits on no node" in r.stderr
    finally:
        ray.shutdown()
        cluster.shutdown()
