"""`grpo.runtime=one_process`: the whole GRPO run in the driver's process, without Ray (issue 26).

On one machine a Ray run keeps a process per role (learner, sampler, reward worker) and Ray's own
(GCS, raylet, dashboard, agents, monitors): measured on the demo-sized model, 1.8 GiB of PSS where
one process holding the same roles peaks at 0.7 GiB (BENCHMARKS "GRPO against TRL"). This runtime
runs the same driver (orchestrator/grpo/driver.py) and the same role classes, in this process:
`OneProcess` answers the part of Ray's API the driver, the rollouts, the weight sync and the
checkpoints use — what Ray's `local_mode` did before Ray removed it. An actor is a plain object
built at `.remote()`; a method call runs at once, in submission order (the order a Ray actor runs
its calls in), and its `Ref` holds the result or the exception, raised at `get()` as Ray raises a
task's error there; an actor whose constructor failed raises `ActorError` (Ray's RayActorError)
from every call. Top-level `Ref` arguments are resolved, as Ray resolves ObjectRefs. Nothing is
copied: a `Ref`'s value is shared, so roles must not modify what they receive (they do not: the
learner reads the chunks, the sampler copies the weights into its model).

What it cannot do, refused by `check_one_process` before anything starts: more than one learner,
sampler or reward worker, expert parallelism, `grpo.mode=async` (nothing overlaps in one process),
a collective weight sync, a cluster address. The torch threads of the process are
`cluster.num_cpus` (default: the cores this process may run on), shared by the phases in turn.

Test: `pytest tests/orchestrator/test_orch_grpo.py -k one_process`; benchmark:
`python benchmarks/grpo_vs_trl.py` (the `one_process` rows).
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

from orchestrator.config import ConfigError, RunConfig


class ActorError(Exception):
    """An actor that could not be built (Ray's RayActorError): its calls raise this; `cause` is why."""

    def __init__(self, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


class Ref:
    """A call's result, or the exception it raised (Ray's ObjectRef, already resolved)."""

    __slots__ = ("_value", "_error")

    def __init__(self, value: Any = None, error: BaseException | None = None):
        self._value, self._error = value, error

    def value(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


def _resolved(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Top-level Ref arguments replaced by their values (a Ref inside a list stays a Ref, as in Ray)."""
    return (tuple(a.value() if isinstance(a, Ref) else a for a in args),
            {k: v.value() if isinstance(v, Ref) else v for k, v in kwargs.items()})


def _run(fn, args: tuple, kwargs: dict, num_returns: int = 1):
    """Ref (or `num_returns` Refs) of fn(*args, **kwargs); an exception goes into every Ref."""
    try:
        a, kw = _resolved(args, kwargs)
        out = fn(*a, **kw)
    except Exception as e:  # raised at get(), as Ray does
        return Ref(error=e) if num_returns == 1 else [Ref(error=e) for _ in range(num_returns)]
    if num_returns == 1:
        return Ref(out)
    if not isinstance(out, (tuple, list)) or len(out) != num_returns:
        err = ValueError(f"{getattr(fn, '__qualname__', fn)} returned {type(out).__name__}, not {num_returns} values")
        return [Ref(error=err) for _ in range(num_returns)]
    return [Ref(v) for v in out]


class _Method:
    def __init__(self, actor: "_Actor", name: str, num_returns: int = 1):
        self._actor, self._name, self._num_returns = actor, name, num_returns

    def options(self, *, num_returns: int = 1, **_ignored) -> "_Method":
        return _Method(self._actor, self._name, num_returns)

    def remote(self, *args, **kwargs):
        actor = self._actor
        if actor._error is not None:
            return Ref(error=actor._error) if self._num_returns == 1 else [Ref(error=actor._error)] * self._num_returns
        if self._name == "__ray_ready__":
            return Ref(True)
        return _run(getattr(actor._obj, self._name), args, kwargs, self._num_returns)


class _Actor:
    """The handle of an in-process actor: `handle.method.remote(...)` calls `method` now."""

    def __init__(self, cls, args: tuple, kwargs: dict):
        self._obj, self._error = None, None
        try:
            a, kw = _resolved(args, kwargs)
            self._obj = cls(*a, **kw)
        except Exception as e:
            self._error = ActorError(e)

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("__") and name != "__ray_ready__":
            raise AttributeError(name)
        return _Method(self, name)


class _Remote:
    """`runtime.remote(cls_or_function)`: `.options(...)` is accepted and ignored (one process has no placement)."""

    def __init__(self, target):
        self._target = target

    def options(self, **_ignored) -> "_Remote":
        return self

    def remote(self, *args, **kwargs):
        if isinstance(self._target, type):
            return _Actor(self._target, args, kwargs)
        return _run(self._target, args, kwargs)


class OneProcess:
    """The subset of the `ray` module the GRPO driver uses, executed in this process; and the
    process's own setup: the learner's rendezvous, the threads, the teardown."""

    exceptions = SimpleNamespace(RayActorError=ActorError)

    def __init__(self, cfg: RunConfig):
        check_one_process(cfg)
        self.threads = process_threads(cfg)

    @staticmethod
    def rendezvous() -> tuple[str, int]:
        """Where the learner's (one-rank) torch.distributed group is hosted."""
        from orchestrator.dist_local import free_port

        return "127.0.0.1", free_port()

    def started(self) -> None:
        """Once the roles are built (each set its torch threads as an actor would): the phases take
        turns on all of the process's threads."""
        import torch

        torch.set_num_threads(self.threads)
        print(f"grpo: learner, sampler and reward worker in this process (grpo.runtime=one_process, {self.threads} threads)", flush=True)

    @staticmethod
    def close() -> None:
        """The learner's group lived in this process: freed for what the process does next."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def remote(self, *args, **_options):
        """`remote(cls)` or `remote(**options)(cls)`, as `ray.remote`."""
        if len(args) == 1 and callable(args[0]):
            return _Remote(args[0])
        return _Remote

    @staticmethod
    def get(refs, timeout: float | None = None):
        if isinstance(refs, (list, tuple)):
            return [r.value() for r in refs]
        return refs.value()

    @staticmethod
    def put(value) -> Ref:
        return Ref(value)

    @staticmethod
    def wait(refs: list, *, num_returns: int = 1, timeout: float | None = None) -> tuple[list, list]:
        return list(refs), []  # every call has already run


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
             ("grpo.mode", g.mode != "sync", "sync (nothing overlaps in one process)"),
             ("grpo.weight_sync", g.weight_sync == "collective", "auto or object_store"),
             ("cluster.address", cfg.cluster.address is not None, "none (a one-process run starts no Ray)")]
    for key, bad, fix in fixes:
        if bad:
            raise ConfigError(f"key '{key}' cannot be honoured with grpo.runtime=one_process (learner, sampler and reward worker "
                              f"in this process): set {key} to {fix}, or grpo.runtime=ray")


__all__ = ["ActorError", "NoPlacement", "OneProcess", "Ref", "check_one_process", "process_threads"]
