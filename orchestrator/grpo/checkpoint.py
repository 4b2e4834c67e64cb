"""GRPO checkpoints: every learner's DeepSpeed state (policy, optimizer) plus the driver's state
(step, policy version, data position), so that re-running with the same `--out` resumes the run
as if it had not stopped.

Layout (orchestrator/checkpoints.py reads it too, for `sputnik export`): the learners save with
`engine.save_checkpoint(RUN/checkpoints/learners, tag)`, then the driver writes the marker
`RUN/checkpoints/<tag>.json` last; a checkpoint without its marker is incomplete and ignored.

Test: `pytest tests/orchestrator/test_orch_grpo.py -k resume`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path


@dataclasses.dataclass
class DriverState:
    step: int
    version: int  # policy version (updates applied)
    data_position: int  # train prompts drawn so far
    tag: str = ""


def step_tag(step: int) -> str:
    return f"step{step:06d}"


def save(ray, learners: list, run_dir: Path, state: DriverState, *, keep: int) -> None:
    """Save all learners, then the marker; keep the latest `keep` complete checkpoints."""
    ckpt = Path(run_dir) / "checkpoints"
    state.tag = step_tag(state.step)
    ray.get([l.save.remote(str(ckpt / "learners"), state.tag, {"version": state.version, "step": state.step}) for l in learners])
    tmp = ckpt / f".{state.tag}.json.tmp"
    tmp.write_text(json.dumps(dataclasses.asdict(state)))
    tmp.replace(ckpt / f"{state.tag}.json")  # the marker that makes the checkpoint complete
    for old in sorted(ckpt.glob("step*.json"))[:-keep]:
        shutil.rmtree(ckpt / "learners" / old.stem, ignore_errors=True)
        old.unlink()


def latest(run_dir: Path) -> DriverState | None:
    done = sorted((Path(run_dir) / "checkpoints").glob("step*.json"))
    return DriverState(**json.loads(done[-1].read_text())) if done else None


def load(ray, learners: list, run_dir: Path, state: DriverState) -> None:
    ray.get([l.load.remote(str(Path(run_dir) / "checkpoints" / "learners"), state.tag) for l in learners])
