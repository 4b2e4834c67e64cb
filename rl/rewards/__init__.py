"""Verifiable rewards: the registry (built-in names or `path/to/file.py:function`), the math
reward, the sandboxed code reward, the R1-Zero format reward and the DAPO overlong penalty;
`RewardConfig` is the `rewards:` section of a run config.

Test: `pytest tests/rl/`.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from rl.rewards import builtin  # noqa: F401  (registers math_accuracy, code_tests, format, overlong)


@dataclasses.dataclass
class RewardSpec:
    __pydantic_config__ = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str  # registry name or path/to/file.py:function
    weight: float = 1.0
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # passed to the reward in `sample`


@dataclasses.dataclass
class RewardConfig:
    __pydantic_config__ = ConfigDict(extra="forbid", allow_inf_nan=False)
    rewards: list[RewardSpec] = dataclasses.field(  # rewards summed with weights: [{name: math_accuracy, weight: 1.0, options: {}}, ...] (configs/rewards_example.yaml)
        default_factory=lambda: [RewardSpec("math_accuracy", 1.0), RewardSpec("format", 0.1)]
    )
    max_workers: Annotated[int, Field(ge=1)] = 2  # concurrent samples per evaluator
    timeout_s: Annotated[float, Field(gt=0)] = 30.0  # per reward call of a reward file; per sample for the rest
    # The code sandbox's isolation. "full" (root, unshare, a memory cgroup or seccomp): the reward
    # evaluators refuse to start where the node lacks it. "reduced" is an explicit opt-in for
    # trusted code on a laptop: the program then shares the evaluator's uid and file system.
    isolation: Literal["full", "reduced"] = "full"
    # Re-run each full-reward code completion against the task's reference solution (issue #17)
    # and score 0 on a disagreement; only for tasks whose row has a reference (`answer`).
    second_opinion: bool = True


__all__ = ["RewardConfig", "RewardSpec"]
