"""`grpo.runtime=one_process` (orchestrator/one_process.py): the GRPO roles in the driver's process.

The runtime's semantics are Ray's, checked on plain actors: in sync mode a call runs at once on
the caller's thread; in async mode calls on one actor run in submission order on the actor's own
thread, calls on different actors at the same time, ObjectRef arguments are resolved on the
callee's thread; a failed constructor fails every call. Whole runs repeat the Ray
runs step for step: sync against `sputnik grpo` on Ray actors (no Ray process started), async
(sampling ahead of the learner, on the actors' threads) against the Ray driver's async run.
"""

import contextlib
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from tests.orchestrator.test_orch_grpo import REPO, assert_same_steps, driver_for, grpo_args, make_cfg, per_step


def runtime(mode: str, threads: int = 2):
    from orchestrator.config import load_config
    from orchestrator.one_process import OneProcess

    return OneProcess(load_config(None, ["grpo.runtime=one_process", f"grpo.mode={mode}", f"cluster.num_cpus={threads}"]))


class Counter:
    def __init__(self, start: int):
        self.log, self.n = [], start

    def add(self, k: int) -> int:
        time.sleep(0.01 * max(0, 5 - k))  # later calls are quicker: only the queue keeps them in order
        self.log.append((k, threading.current_thread().name))
        self.n += k
        return self.n

    def pair(self) -> tuple[int, str]:
        return self.n, threading.current_thread().name


class Gate:
    def __init__(self, event: threading.Event):
        self.event = event

    def wait_open(self, timeout: float) -> bool:
        return self.event.wait(timeout)

    def open(self) -> bool:
        self.event.set()
        return True


class Broken:
    def __init__(self):
        raise ValueError("no model here")


def test_in_sync_mode_a_call_runs_at_once_on_the_callers_thread():
    rt = runtime("sync")
    c = rt.remote(Counter).remote(10)
    ref = c.add.remote(5)
    assert ref.future.done() and rt.get(ref) == 15
    assert rt.get(c.pair.options(num_returns=2).remote()) == [15, threading.current_thread().name]
    rt.close()


def test_in_async_mode_actor_calls_run_in_order_on_the_actors_own_thread_and_actors_run_at_once():
    rt = runtime("async")
    try:
        c = rt.remote(Counter).remote(10)
        refs = [c.add.remote(k) for k in range(5)]
        assert rt.get(refs) == [10, 11, 13, 16, 20]  # submission order, though call 0 sleeps longest
        n, name = rt.get(c.pair.options(num_returns=2).remote())
        assert n == 20 and name.startswith("actor-Counter") and name != threading.current_thread().name
        # A's call waits for B's: run one after the other it would time out (False); at once, B opens it
        event = threading.Event()
        a, b = rt.remote(Gate).remote(event), rt.remote(Gate).remote(event)
        waiting = a.wait_open.remote(30.0)
        done, pending = rt.wait([waiting], num_returns=1, timeout=0.2)
        assert done == [] and pending == [waiting] and not event.is_set()
        with pytest.raises(rt.exceptions.GetTimeoutError):
            rt.get(waiting, timeout=0.1)
        assert rt.get(b.open.remote()) is True and rt.get(waiting, timeout=5) is True
        # an ObjectRef argument is resolved on the callee's thread, once its producer is done
        assert rt.get(rt.remote(Counter).remote(0).add.remote(c.add.remote(1))) == 21
    finally:
        rt.close()


def test_close_leaves_the_callers_group_and_deepspeed_can_still_build_an_engine():
    """A default group made before the runtime (here, as by the in-process learner tests: kept for
    the process) is the caller's: close() leaves it, and DeepSpeed, which cached it, still builds."""
    import torch
    import torch.distributed as dist

    from orchestrator.dist_local import free_port, join_local_group
    from orchestrator.ds_config import import_deepspeed

    if not dist.is_initialized():
        join_local_group(0, 1, free_port(), threads=torch.get_num_threads())
    deepspeed = import_deepspeed()
    for mode in ("sync", "async"):
        rt = runtime(mode)
        rt.get(rt.remote(Counter).remote(0).add.remote(5))
        rt.close()
        assert dist.is_initialized() and dist.get_world_size() == 1
        engine, *_ = deepspeed.initialize(model=torch.nn.Linear(2, 2), config={"train_micro_batch_size_per_gpu": 1})
        assert engine.world_size == 1


def test_a_failed_constructor_fails_every_call_and_wait_returns_the_done_first():
    from orchestrator.one_process import ActorError

    rt = runtime("async")
    try:
        broken = rt.remote(Broken).remote()
        for ref in (broken.__ray_ready__.remote(), broken.anything.remote(1)):
            with pytest.raises(ActorError, match="ValueError: no model here"):
                rt.get(ref)
        slow, quick = rt.remote(Counter).remote(0), rt.remote(Counter).remote(100)
        refs = [slow.add.remote(0), quick.add.remote(4)]  # 50 ms against 10 ms
        done, rest = rt.wait(refs, num_returns=1)
        assert done == [refs[1]] and rest == [refs[0]]
        done, rest = rt.wait(refs, num_returns=2)
        assert done == refs and rest == []
        with pytest.raises(ValueError, match="num_returns=3"):
            rt.get(quick.pair.options(num_returns=3).remote()[0])
    finally:
        rt.close()
@pytest.mark.slow
@pytest.mark.ray
def test_one_process_run_repeats_the_ray_run_without_ray(policy_dir, straight_run, tmp_path):
    """grpo.runtime=one_process: the same driver and roles in one process, no Ray process started
    (watched in the run's process tree), the Ray run's steps to rounding (1 thread, as each actor has)."""
    import psutil

    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "orchestrator.cli", *grpo_args(policy_dir), "grpo.runtime=one_process", "cluster.num_cpus=1",
           "--out", str(tmp_path / "one")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: set[str] = set()
    try:
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                seen |= {c.name() for c in psutil.Process(proc.pid).children(recursive=True)}
            time.sleep(0.1)
    finally:
        proc.kill()
    out = proc.stdout.read()
    assert proc.returncode == 0, out[-3000:]
    assert "grpo.runtime=one_process, 1 threads" in out
    assert not {n for n in seen if "raylet" in n or "gcs_server" in n or n.startswith("ray::")}, seen
    assert_same_steps(straight_run, tmp_path / "one", [1, 2, 3, 4])
    assert (tmp_path / "one" / "hf" / "config.json").exists()  # the exported policy, as a Ray run writes it


def test_one_process_refuses_what_it_cannot_honour(policy_dir):
    from orchestrator.config import ConfigError
    from orchestrator.grpo.inputs import validate
    for key, value in [("grpo.learners", 2), ("rollout.num_samplers", 2), ("grpo.weight_sync", "collective"),
                       ("cluster.address", "127.0.0.1:6379")]:
        with pytest.raises(ConfigError, match=f"key '{key}' cannot be honoured with grpo.runtime=one_process"):
            validate(make_cfg(policy_dir, "grpo.runtime=one_process", f"{key}={value}", "grpo.minibatch_size=4"))


@pytest.fixture(scope="module")
def ray_session():
    from orchestrator.config import ClusterConfig
    from orchestrator.ray_local import init_ray

    ray = init_ray(ClusterConfig(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_async_mode_samples_one_version_behind_on_ray_and_in_one_process(policy_dir, ray_session, tmp_path):
    """grpo.mode=async on Ray actors samples step k+1 while step k trains (version lag 1 from step
    2); the one-process runtime, its sampler on its own thread beside the learner's, makes the same
    steps to rounding (1 torch thread per role in both)."""
    common = ["grpo.mode=async", "grpo.steps=3", "grpo.eval_every=3", "grpo.checkpoint_every=3"]
    runs = {}
    for runtime_name in ("ray", "one_process"):
        cfg = make_cfg(policy_dir, *common, f"grpo.runtime={runtime_name}")
        d, tracker = driver_for(cfg, tmp_path / runtime_name)
        try:
            runs[runtime_name] = d.run()
        finally:
            d.close()
            tracker.close()
        assert d.version == 3 and runs[runtime_name]["after"] is not None
        assert per_step(tmp_path / runtime_name, "rollout/version_lag") == {1: 0.0, 2: 1.0, 3: 1.0}
        assert (tmp_path / runtime_name / "checkpoints" / "step000003.json").is_file()
    rows = [json.loads(l) for l in (tmp_path / "ray" / "rollouts.jsonl").read_text().splitlines()]
    assert rows and {"prompt", "completion", "reference", "reward", "math_accuracy", "length", "advantage"} <= set(rows[0])
    assert_same_steps(tmp_path / "ray", tmp_path / "one_process", [1, 2, 3])
    assert runs["ray"]["after"].greedy == runs["one_process"]["after"].greedy
