"""Multi-node runs. First, GRPO on a multi-node Ray cluster simulated on this machine (ray.cluster_utils.Cluster, every
node on 127.0.0.1): the roles land in their placement groups across nodes (samplers and
evaluators spread, as `make_plan` plans them), and removing a node that hosts a sampler in the
middle of a step loses nothing: the sampler restarts on another node, the step completes with
every prompt scored exactly once, and the next step samples with the updated policy.

Then a real two-node cluster (root only): a head and a worker raylet in two network namespaces
joined by a veth pair, `ray job submit` of pretraining, `ray job stop`, a resubmission that
resumes, and GRPO from it across both nodes (test_ray_job_submit_on_a_two_node_cluster_...)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------
# A real two-node Ray cluster: two raylets in their own network namespaces, `ray job submit`
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's python and ray
HEAD_IP, WORKER_IP = "10.213.0.1", "10.213.0.2"  # only inside the test's own namespaces
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}


def sh(*cmd, check=True, timeout=120, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def in_ns(ns: str, *cmd, **kw):
    return sh("ip", "netns", "exec", ns, *cmd, env={**os.environ, **RAY_ENV}, **kw)


def end_namespace(ns: str) -> None:
    """Stop every process in `ns` (all of them started by this test), then delete it. Not `ray
    stop`: it picks Ray processes by name machine-wide, namespaces or not, and would stop other
    Ray instances on this machine."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline and sh("ip", "netns", "pids", ns, check=False).stdout.split():
            time.sleep(0.2)
    sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def two_node_cluster():
    """A Ray head (with the dashboard) in one network namespace and a worker node in another,
    joined by a veth pair; yields (head namespace, worker namespace)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (CI runs as root)")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` for network namespaces")
    try:
        import aiohttp  # noqa: F401  (the dashboard that `ray job submit` talks to: ray[default])
    except ImportError:
        pytest.skip('needs ray[default] for the dashboard: pip install -e ".[cluster]"')
    tag = f"{os.getpid() % 100000}"
    head, worker = f"sputnik-h{tag}", f"sputnik-w{tag}"
    temp_dir = Path(f"/tmp/spray{tag}")  # short: Ray's socket paths must stay under 108 bytes
    made: list[str] = []
    try:
        for ns in (head, worker):
            if sh("ip", "netns", "add", ns, check=False).returncode != 0:
                pytest.skip("network namespaces are not available here (`ip netns add` failed)")
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", f"sph{tag}", "type", "veth", "peer", "name", f"spw{tag}")
        for ns, dev, ip in ((head, f"sph{tag}", HEAD_IP), (worker, f"spw{tag}", WORKER_IP)):
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        in_ns(head, BIN / "ray", "start", "--head", "--node-ip-address", HEAD_IP, "--port", "6379", "--num-cpus", "2",
              "--include-dashboard", "true", "--dashboard-host", HEAD_IP, "--dashboard-port", "8265", "--temp-dir", temp_dir,
              "--disable-usage-stats", timeout=180)
        in_ns(worker, BIN / "ray", "start", "--address", f"{HEAD_IP}:6379", "--node-ip-address", WORKER_IP, "--num-cpus", "2",
              "--disable-usage-stats", timeout=180)
        yield head, worker
    finally:
        for ns in reversed(made):
            end_namespace(ns)
        sh("ip", "link", "del", f"sph{tag}", check=False)  # gone with its namespace unless that failed
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_job(head: str, *args, **kw):
    return in_ns(head, BIN / "ray", "job", *args[:1], "--address", f"http://{HEAD_IP}:8265", *args[1:], **kw)


def history_steps(run_dir: Path) -> list[int]:
    from orchestrator.wandb_offline import offline_history

    return [row["_step"] for row in offline_history(run_dir)]


def metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.ray
def test_ray_job_submit_on_a_two_node_cluster_stop_and_resume(two_node_cluster, tmp_path):
    """As the README tells users: pretraining submitted with `--working-dir .`, stopped with `ray
    job stop` and submitted again (it resumes), then GRPO from it, its samplers and reward workers
    on both nodes as `sputnik plan` plans them for this cluster."""
    head, _ = two_node_cluster
    pre, grpo, cache = tmp_path / "pretrain", tmp_path / "grpo", tmp_path / "cache"
    runtime_env = {"excludes": [".git", ".venv", "runs", "*.egg-info"],
                   "env_vars": {"DS_ACCELERATOR": "cpu", "SPUTNIK_CACHE": str(cache), "WANDB_MODE": "offline",
                                "RAY_JOB_STOP_WAIT_TIME_S": "60"}}
    submit = ["submit", "--working-dir", REPO, "--runtime-env-json", json.dumps(runtime_env)]
    py = [BIN / "python", "-m", "orchestrator.cli"]
    pretrain = [*py, "pretrain", "data.math_docs=1000", "data.seq_len=64", "data.shard_docs=500", "pretrain.workers=1",
                "pretrain.micro_batch_size=4", "pretrain.warmup_steps=2", "pretrain.steps=8", "pretrain.checkpoint_every=2",
                "tracking.wandb_mode=offline", "--out", pre]

    # 1. pretraining, stopped between its checkpoints
    t0 = time.monotonic()
    ray_job(head, *submit, "--submission-id", "pretrain-1", "--no-wait", "--", *pretrain)
    deadline = t0 + 240
    while not ((pre / "metrics.jsonl").exists() and len(metric_steps(pre)) >= 3):
        if time.monotonic() > deadline or not (pre / "config.yaml").exists():  # each `ray job status` costs a second of CPU
            status = (lambda r: r.stdout + r.stderr)(ray_job(head, "status", "pretrain-1", check=False))
            assert time.monotonic() < deadline and "FAILED" not in status and "SUCCEEDED" not in status, \
                status + ray_job(head, "logs", "pretrain-1", check=False).stdout[-3000:]
        time.sleep(0.5)
    ray_job(head, "stop", "pretrain-1", timeout=120)
    assert "was stopped" in (lambda r: r.stdout + r.stderr)(ray_job(head, "status", "pretrain-1"))
    print(f"{time.monotonic() - t0:.0f}s: pretraining stopped")
    logs = ray_job(head, "logs", "pretrain-1").stdout
    assert "pretrain: step 1/8 loss" in logs and "stopped (SIGTERM)" in logs, logs[-3000:]
    stopped = metric_steps(pre)
    from orchestrator.tracking import wait_follower

    assert wait_follower(pre, 60), (pre / "wandb-follower.log").read_text()  # the detached W&B follower finishes
    stopped = metric_steps(pre)
    assert stopped == list(range(1, len(stopped) + 1)) and history_steps(pre) == stopped  # every logged step in W&B

    # 2. the same submission again resumes it
    r = ray_job(head, *submit, "--submission-id", "pretrain-2", "--", *pretrain, timeout=400)
    logs = ray_job(head, "logs", "pretrain-2").stdout
    assert "succeeded" in r.stdout + r.stderr and "pretrain: resumed from step" in logs, (r.stdout + logs)[-3000:]
    print(f"{time.monotonic() - t0:.0f}s: pretraining resumed and done")
    assert metric_steps(pre) == history_steps(pre) == list(range(1, 9))  # no step twice, in the file or in W&B
    assert len(list((pre / "wandb").glob("offline-run-*"))) == 2  # one W&B run id, continued
    # what GRPO needs is in the run directory, not in the job's working directory Ray deletes
    assert (pre / "tokenizer.json").is_file() and (pre / "hf" / "config.json").is_file()
    assert "runtime_resources" not in json.loads((pre / "summary.json").read_text())["corpus_cache"]

    # 3. GRPO from it, roles over both nodes; the plan for this live cluster
    counts = ["rollout.num_samplers=2", "grpo.num_evaluators=2"]
    plan = in_ns(head, *py, "plan", "--address", f"{HEAD_IP}:6379", *counts, cwd=REPO, timeout=120)
    r = ray_job(head, *submit, "--submission-id", "grpo-1", "--", *py, "grpo", f"grpo.init={pre}", *counts,
                "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.heldout_size=4", "grpo.train_size=64",
                "rollout.max_new_tokens=24", "grpo.steps=2", "grpo.eval_every=100", "grpo.checkpoint_every=2",
                "tracking.wandb_mode=offline", "--out", grpo, timeout=400)
    logs = ray_job(head, "logs", "grpo-1").stdout
    assert "succeeded" in r.stdout + r.stderr and "grpo: step 2/2 reward" in logs, (r.stdout + logs)[-3000:]
    assert metric_steps(grpo)[-1] == 2
    print(f"{time.monotonic() - t0:.0f}s: GRPO done")
    actors = json.loads(in_ns(head, BIN / "ray", "list", "actors", "--address", f"http://{HEAD_IP}:8265", "--detail",
                              "--format", "json", "--limit", "1000").stdout)
    placed = {}
    for role, cls in (("learner", "PolicyLearner"), ("sampler", "RolloutSampler"), ("evaluator", "RewardWorker")):
        nodes = [a["node_id"] for a in actors if a["class_name"] == cls]
        placed[role] = sorted(Counter(nodes).values(), reverse=True)
    from tests.orchestrator.test_orch_placement import plan_table_shapes  # noqa: E402

    assert placed == plan_table_shapes(plan.stdout, list(placed)) == {"learner": [1], "sampler": [1, 1], "evaluator": [1, 1]}, \
        (placed, plan.stdout)
