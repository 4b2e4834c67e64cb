"""`grpo.runtime=one_process`: the whole GRPO run in the driver's process, without Ray (issue 26).

On one machine a Ray run keeps a process per role (learner, sampler, reward worker) and Ray's own
(GCS, raylet, dashboard, agents, monitors): measured on the demo-sized model, 1.8 GiB of PSS where
one process holding the same roles peaks at 0.7 GiB (BENCHMARKS "GRPO against TRL"). This runtime
runs the same driver (orchestrator/grpo/driver.py) and the same role classes, in this process:
`OneProcess` answers the part of Ray's API the driver, the rollouts, the weight sync and the
checkpoints use. An actor is a plain object whose constructor and method calls run in submission
order (the order a Ray actor runs its calls in). With `grpo.mode=sync` they run at once on the
caller's thread: the phases take turns, nothing overlaps. With `grpo.mode=async` each actor has one
worker thread of its own, so the sampler generates the next steps while the learner trains and a
reward worker scores one chunk while the sampler makes the next. A call returns a `Ref` (Ray's
ObjectRef: a future here); `get()` waits and raises the call's exception, as Ray raises a task's
error there; an actor whose constructor failed raises `ActorError` (Ray's RayActorError) from every
call. Top-level `Ref` arguments are resolved on the actor's thread before the call runs, as Ray
resolves ObjectRefs. Nothing is copied: a `Ref`'s value is shared, so roles must not modify what
they receive (they do not: the learner reads the chunks, the sampler copies the weights into its
model, the learner publishes a cloned state).

Torch threads (`cluster.num_cpus`, default the cores this process may run on): torch's intra-op
thread count is per thread. In sync mode the one thread that runs every call uses all of them; in
async mode the learner's and the sampler's threads get half each (at least one), so that the two
OpenMP teams never hold more threads than there are cores (two teams of 2 on 2 cores, each spinning
while the other works, measured 3.5x slower decoding than one). The GIL is released inside torch's
kernels, where the time goes.

What it cannot do, refused by `check_one_process` before anything starts: more than one learner,
sampler or reward worker, expert parallelism, a collective weight sync, a cluster address.

Test: `pytest tests/orchestrator/test_orch_one_process.py`; benchmark: `python benchmarks/grpo_vs_trl.py`
(the `one_process` and `one_process_async` rows).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import time
from types import SimpleNamespace
from typing import Any

from orchestrator.config import ConfigError, RunConfig


class ActorError(Exception):
    """An actor that could not be built (Ray's RayActorError): its calls raise this; `cause` is why."""

    def __init__(self, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


class Ref:
    """A call's result (Ray's ObjectRef): the call's future, and which of its `num_returns` values."""

    __slots__ = ("future", "index", "count")

    def __init__(self, future: cf.Future, index: int | None = None, count: int = 1):
        self.future, self.index, self.count = future, index, count

    @classmethod
    def of(cls, value: Any) -> "Ref":
        f: cf.Future = cf.Future()
        f.set_result(value)
        return cls(f)

    def value(self, timeout: float | None = None) -> Any:
        out = self.future.result(timeout)  # raises the call's exception
        if self.index is None:
            return out
        if not isinstance(out, (tuple, list)) or len(out) != self.count:
            raise ValueError(f"a call with num_returns={self.count} returned {type(out).__name__}, not {self.count} values")
        return out[self.index]


def _resolved(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Top-level Ref arguments replaced by their values (a Ref inside a list stays a Ref, as in Ray)."""
    return (tuple(a.value() if isinstance(a, Ref) else a for a in args),
            {k: v.value() if isinstance(v, Ref) else v for k, v in kwargs.items()})


def _refs(future: cf.Future, num_returns: int):
    return Ref(future) if num_returns == 1 else [Ref(future, i, num_returns) for i in range(num_returns)]


def _settled(fn, *args) -> cf.Future:
    """fn(*args) run now, on this thread: its result, or its exception (raised at get(), as Ray does)."""
    f: cf.Future = cf.Future()
    try:
        f.set_result(fn(*args))
    except Exception as e:
        f.set_exception(e)
    return f


class _Method:
    def __init__(self, actor: "_Actor", name: str, num_returns: int = 1):
        self._actor, self._name, self._num_returns = actor, name, num_returns

    def options(self, *, num_returns: int = 1, **_ignored) -> "_Method":
        return _Method(self._actor, self._name, num_returns)

    def remote(self, *args, **kwargs):
        return _refs(self._actor._submit(self._name, args, kwargs), self._num_returns)


class _Actor:
    """The handle of an in-process actor: `handle.method.remote(...)` queues `method` on the actor's thread."""

    def __init__(self, cls, args: tuple, kwargs: dict, runtime: "OneProcess"):
        self._obj, self._error = None, None
        # sync mode: no thread, every call runs at once on the caller's (nothing overlaps there)
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"actor-{cls.__name__}") if runtime.mode == "async" else None
        runtime.actors.append(self)
        self._built = self.run(self._build, cls, args, kwargs)

    def _build(self, cls, args: tuple, kwargs: dict) -> bool:
        try:
            a, kw = _resolved(args, kwargs)
            self._obj = cls(*a, **kw)
        except Exception as e:
            self._error = ActorError(e)
        return True

    def _call(self, name: str, args: tuple, kwargs: dict):
        if self._error is not None:
            raise self._error
        if name == "__ray_ready__":
            return True
        a, kw = _resolved(args, kwargs)
        return getattr(self._obj, name)(*a, **kw)

    def _submit(self, name: str, args: tuple, kwargs: dict) -> cf.Future:
        return self.run(self._call, name, args, kwargs)

    def run(self, fn, *args) -> cf.Future:
        """fn(*args) on this actor's thread, after the calls queued before it (or now, in sync mode)."""
        return self._pool.submit(fn, *args) if self._pool is not None else _settled(fn, *args)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_") and name != "__ray_ready__":
            raise AttributeError(name)
        return _Method(self, name)


class _Remote:
    """`runtime.remote(cls_or_function)`: `.options(...)` is accepted and ignored (one process has no placement)."""

    def __init__(self, target, runtime: "OneProcess"):
        self._target, self._runtime = target, runtime

    def options(self, **_ignored) -> "_Remote":
        return self

    def remote(self, *args, **kwargs):
        if isinstance(self._target, type):
            return _Actor(self._target, args, kwargs, self._runtime)
        def call():  # a remote function (not an actor): at once, on the caller's thread
            a, kw = _resolved(args, kwargs)
            return self._target(*a, **kw)

        return Ref(_settled(call))


class OneProcess:
    """The subset of the `ray` module the GRPO driver uses, executed in this process; and the
    process's own setup: the learner's rendezvous, the threads, the teardown."""

    exceptions = SimpleNamespace(RayActorError=ActorError, GetTimeoutError=cf.TimeoutError)

    def __init__(self, cfg: RunConfig):
        import torch.distributed as dist

        check_one_process(cfg)
        self.threads = process_threads(cfg)
        self.mode = cfg.grpo.mode
        self.actors: list[_Actor] = []
        self.owns_group = not dist.is_initialized()  # a group made before (by the caller) is left to it

    @staticmethod
    def rendezvous() -> tuple[str, int]:
        """Where the learner's (one-rank) torch.distributed group is hosted."""
        from orchestrator.dist_local import free_port

        return "127.0.0.1", free_port()

    def started(self, busy: list, *, who: str = "grpo: learner, sampler and reward worker") -> None:
        """Once the roles are queued for building, their torch threads: in sync mode the caller's
        thread, where every call runs, gets all of the process's (the phases take turns); in async
        mode the threads of the `busy` actors (learners, samplers), which run at once, half each.
        Returns when every actor is built."""
        import torch

        if self.mode == "sync":
            torch.set_num_threads(self.threads)
            how = "the phases taking turns on them"
        else:
            n = max(1, self.threads // 2)
            cf.wait([a.run(torch.set_num_threads, n) for a in busy] + [a._built for a in self.actors])
            how = f"{n} each for the learner's and the sampler's threads"
        print(f"{who} in this process (grpo.runtime=one_process, {self.threads} threads, "
              f"{how})", flush=True)

    def close(self) -> None:
        """Each actor's thread finishes its queue (calls not started are cancelled); the learner's
        group lived in this process: freed for what the process does next (through DeepSpeed when
        it made it, which also drops DeepSpeed's references: a group destroyed behind its back
        stays cached and breaks the next engine made in this process)."""
        import sys

        import torch.distributed as dist

        for a in self.actors:
            a.shutdown()
        self.actors = []
        if self.owns_group and dist.is_initialized():
            comm = sys.modules.get("deepspeed.comm")
            if comm is not None and comm.comm.cdb is not None:
                comm.destroy_process_group()
            else:
                dist.destroy_process_group()

    def remote(self, *args, **_options):
        """`remote(cls)` or `remote(**options)(cls)`, as `ray.remote`."""
        if len(args) == 1 and callable(args[0]):
            return _Remote(args[0], self)
        return lambda target: _Remote(target, self)

    @staticmethod
    def get(refs, timeout: float | None = None):
        if isinstance(refs, (list, tuple)):
            deadline = None if timeout is None else time.monotonic() + timeout
            return [r.value(None if deadline is None else max(0.0, deadline - time.monotonic())) for r in refs]
        return refs.value(timeout)

    @staticmethod
    def put(value) -> Ref:
        return Ref.of(value)

    @staticmethod
    def wait(refs: list, *, num_returns: int = 1, timeout: float | None = None) -> tuple[list, list]:
        """(the first `num_returns` refs done, in the order given; the rest), as ray.wait."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            done = [r for r in refs if r.future.done()]
            left = None if deadline is None else deadline - time.monotonic()
            if len(done) >= num_returns or (left is not None and left <= 0):
                break
            cf.wait({r.future for r in refs if not r.future.done()}, timeout=left, return_when=cf.FIRST_COMPLETED)
        ready = done[:num_returns]
        return ready, [r for r in refs if not any(r is d for d in ready)]


class NoPlacement:
    """RolePlacement's interface for one process: no bundles to reserve or release."""

    def options(self, role: str, index: int) -> dict:
        return {}

    def close(self) -> None:
        pass


def process_threads(cfg: RunConfig) -> int:
    """Torch threads of a one-process run: cluster.num_cpus, else the cores this process may use."""
    return cfg.cluster.num_cpus or len(os.sched_getaffinity(0))


def check_one_process(cfg: RunConfig) -> None:
    """One line naming the key that a one-process run cannot honour (before anything starts)."""
    g, r = cfg.grpo, cfg.rollout
    fixes = [("grpo.learners", g.learners != 1, "1"), ("rollout.num_samplers", r.num_samplers != 1, "1"),
             ("grpo.num_evaluators", g.num_evaluators != 1, "1"), ("grpo.expert_parallel", g.expert_parallel != 1, "1"),
             ("rollout.expert_parallel", r.expert_parallel != 1, "1"),
             ("grpo.weight_sync", g.weight_sync == "collective", "auto or object_store"),
             ("cluster.address", cfg.cluster.address is not None, "none (a one-process run starts no Ray)")]
    for key, bad, fix in fixes:
        if bad:
            raise ConfigError(f"key '{key}' cannot be honoured with grpo.runtime=one_process (learner, sampler and reward worker "
                              f"in this process): set {key} to {fix}, or grpo.runtime=ray")


__all__ = ["ActorError", "NoPlacement", "OneProcess", "Ref", "check_one_process", "process_threads"]
