"""The reward registry: built-in rewards by name, researchers' rewards by `path/to/file.py:function`.

    from rl.rewards.registry import reward

    @reward("my_reward")
    def my_reward(completion: str, sample: Mapping) -> float: ...

A config names rewards by registry name or by `path/to/file.py:function`. File rewards are
reloaded when the file changes (checked once per scoring call, i.e. at the next GRPO step), so a
researcher can edit a reward while a run goes on. A file that fails to import, or a function that
raises or returns something that is not a finite number, gives that sample 0; the error is
counted and its first occurrences logged — a reward never crashes a run.

Test: `pytest tests/rl/test_rewards_registry.py`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
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
    fn: RewardFn | None = None
    error: str | None = None

    def refresh(self) -> bool:
        """Re-import when the file's content changed; True if it was (re)loaded."""
        try:
            data = self.path.read_bytes()
        except OSError as e:
            self.fn, self.error, self.digest = None, f"cannot read {self.path}: {e.strerror}", ""
            return False
        digest = hashlib.sha256(data).hexdigest()
        if digest == self.digest:
            return False
        self.digest = digest
        try:
            spec = importlib.util.spec_from_file_location(f"sputnik_reward_{digest[:12]}", self.path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            fn = getattr(module, self.func, None)
            if not callable(fn):
                raise AttributeError(f"{self.path} defines no function {self.func!r}")
            self.fn, self.error = fn, None
        except Exception as e:  # the researcher's file: any error is reported, never raised
            self.fn, self.error = None, f"{self.path}:{self.func} failed to load: {type(e).__name__}: {e}"
        return True


@dataclass
class RewardSet:
    """The configured rewards with weights; `score` never raises because of a reward."""

    specs: list[tuple[str, float, dict]]
    errors: Counter = field(default_factory=Counter)
    _files: dict[str, _FileReward] = field(default_factory=dict)

    def __post_init__(self):
        builtins = registered()
        for name, _, _ in self.specs:
            if ":" in name and name.rsplit(":", 1)[0].endswith(".py"):
                path, func = name.rsplit(":", 1)
                self._files[name] = _FileReward(Path(path), func)
            elif name not in builtins:
                raise ValueError(f"unknown reward {name!r} (built-in: {', '.join(builtins)}; or path/to/file.py:function)")
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

    def _count(self, name: str, message: str) -> None:
        self.errors[name] += 1
        n = self.errors[name]
        if n <= 3 or n in (10, 100, 1000):  # bounded logging
            log.warning("reward %s: %s (error %d for this reward)", name, message, n)

    def fn(self, name: str) -> RewardFn | None:
        return self._files[name].fn if name in self._files else _BUILTIN[name]

    def score_one(self, name: str, completion: str, sample: Mapping, options: dict) -> tuple[float, str | None]:
        fn = self.fn(name)
        if fn is None:
            err = self._files[name].error or "not loaded"
            self._count(name, err)
            return 0.0, err
        try:
            value = fn(completion, {**sample, **options}) if options else fn(completion, sample)
        except Exception as e:
            msg = f"raised {type(e).__name__}: {e} at {traceback.extract_tb(e.__traceback__)[-1].lineno}"
            self._count(name, msg)
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
