"""The reward registry: built-in rewards by name, researchers' rewards by `path/to/file.py:function`.

    from rl.rewards.registry import reward

    @reward("my_reward")
    def my_reward(completion: str, sample: Mapping) -> float: ...

A config names rewards by registry name or by `path/to/file.py:function`. File rewards are
reloaded when the file changes (checked once per scoring call, i.e. at the next GRPO step), so a
researcher can edit a reward while a run goes on. They run in worker processes
(rl/rewards/worker.py) with a per-call time limit: a function that never returns is killed with
its process and scores 0 like any other error, and the pool's slot is free again (issue #17).
A file that fails to compile or import, or a function that raises, times out or returns something
that is not a finite number, gives that sample 0; the error is counted and its first occurrences
logged — a reward never crashes a run.

Test: `pytest tests/rl/test_rewards_registry.py`.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
import sys
import threading
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

log = logging.getLogger(__name__)

RewardFn = Callable[[str, Mapping], float]
_BUILTIN: dict[str, RewardFn] = {}


def reward(name: str):
    """Register a built-in reward under `name`."""

    def deco(fn: RewardFn) -> RewardFn:
        if name in _BUILTIN and _BUILTIN[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered")
        _BUILTIN[name] = fn
        return fn

    return deco


def registered() -> list[str]:
    import rl.rewards  # noqa: F401  (registers the built-ins)

    return sorted(_BUILTIN)


@dataclass
class _FileReward:
    path: Path
    func: str
    digest: str = ""
    source: str = ""
    error: str | None = None

    def refresh(self) -> bool:
        """Re-read when the file's content changed; True if it did. The file is compiled here (a
        syntax error is reported at once) and imported in the worker processes."""
        try:
            data = self.path.read_bytes()
        except OSError as e:
            self.source, self.error, self.digest = "", f"cannot read {self.path}: {e.strerror}", ""
            return False
        digest = hashlib.sha256(data).hexdigest()
        if digest == self.digest:
            return False
        self.digest = digest
        try:
            self.source = data.decode("utf-8")
            compile(self.source, str(self.path), "exec")
            self.error = None
        except (SyntaxError, ValueError, UnicodeDecodeError) as e:
            self.source, self.error = "", f"{self.path}:{self.func} failed to load: {type(e).__name__}: {e}"
        return True


def _call_file_reward(request: tuple, state: dict) -> float:
    """In a worker process: import the file's current version once, then call its function."""
    path, digest, source, func, completion, sample = request
    loaded = state.get(path)
    if loaded is None or loaded[0] != digest:
        module = type(importlib)(f"sputnik_reward_{digest[:12]}")
        module.__file__ = path
        sys.modules[module.__name__] = module  # dataclasses and pickling look the module up
        try:
            exec(compile(source, path, "exec"), module.__dict__)
        except Exception as e:
            raise ImportError(f"{path} failed to load: {type(e).__name__}: {e}") from None
        state[path] = loaded = (digest, module)
    fn = getattr(loaded[1], func, None)
    if not callable(fn):
        raise AttributeError(f"{path} defines no function {func!r}")
    return fn(completion, sample)


@dataclass
class RewardSet:
    """The configured rewards with weights; `score` never raises because of a reward.

    File rewards run in `processes` worker processes, each call limited to `timeout_s`."""

    specs: list[tuple[str, float, dict]]
    timeout_s: float = 30.0
    processes: int = 2
    errors: Counter = field(default_factory=Counter)
    timeouts: int = 0
    _files: dict[str, _FileReward] = field(default_factory=dict)
    _pool: object = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        builtins = registered()
        for name, _, _ in self.specs:
            if ":" in name and name.rsplit(":", 1)[0].endswith(".py"):
                path, func = name.rsplit(":", 1)
                self._files[name] = _FileReward(Path(path).resolve(), func)
            elif name not in builtins:
                raise ValueError(f"unknown reward {name!r} (built-in: {', '.join(builtins)}; or path/to/file.py:function)")
        if self._files:
            from rl.rewards.worker import WorkerPool

            self._pool = WorkerPool(__file__, "_call_file_reward", processes=self.processes, eager=True)
        self.refresh()

    def refresh(self) -> list[str]:
        """Reload changed reward files; returns the names reloaded."""
        reloaded = [name for name, f in self._files.items() if f.refresh()]
        for name in reloaded:
            f = self._files[name]
            if f.error:
                self._count(name, f.error)
            else:
                log.info("reward %s (re)loaded", name)
        return reloaded

    def _count(self, name: str, message: str, *, timed_out: bool = False) -> None:
        with self._lock:
            self.errors[name] += 1
            self.timeouts += timed_out
            n = self.errors[name]
        if n <= 3 or n in (10, 100, 1000):  # bounded logging
            log.warning("reward %s: %s (error %d for this reward)", name, message, n)

    def score_one(self, name: str, completion: str, sample: Mapping, options: dict) -> tuple[float, str | None]:
        sample = {**sample, **options} if options else sample
        try:
            if name in self._files:
                f = self._files[name]
                if f.error or not f.source:
                    self._count(name, f.error or "not loaded")
                    return 0.0, f.error or "not loaded"
                value = self._pool.call((str(f.path), f.digest, f.source, f.func, completion, dict(sample)), self.timeout_s)
            else:
                value = _BUILTIN[name](completion, sample)
        except Exception as e:  # includes WorkerFailed: timed out, raised in the worker, died
            if type(e).__name__ == "WorkerFailed":
                msg = str(e)
            else:
                msg = f"raised {type(e).__name__}: {e} at {traceback.extract_tb(e.__traceback__)[-1].lineno}"
            self._count(name, msg, timed_out=getattr(e, "timed_out", False))
            return 0.0, msg
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            msg = f"returned {value!r}, not a finite number"
            self._count(name, msg)
            return 0.0, msg
        return float(value), None

    def score(self, completion: str, sample: Mapping) -> tuple[float, dict[str, float], dict[str, str]]:
        """(weighted total, per-reward values, per-reward errors) for one completion."""
        parts, errs, total = {}, {}, 0.0
        for name, weight, options in self.specs:
            value, err = self.score_one(name, completion, sample, options)
            parts[name] = value
            if err:
                errs[name] = err
            total += weight * value
        return total, parts, errs

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
