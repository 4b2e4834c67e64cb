"""GRPO checkpoints: every learner's DeepSpeed state (policy, optimizer) plus the driver's state
(step, policy version, data position), so that re-running with the same `--out` resumes the run
as if it had not stopped. The layout (and what makes a checkpoint complete) is
orchestrator/checkpoints.py's, which `sputnik export` reads too.

Test: `pytest tests/orchestrator/test_orch_grpo.py -k resume`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from orchestrator.checkpoints import find_checkpoints, grpo_learners_dir, grpo_marker, grpo_state


@dataclasses.dataclass
class DriverState:
    step: int
    version: int  # policy version (updates applied)
    data_position: int  # train prompts drawn so far
    tag: str = ""


def save(ray, learners: list, run_dir: Path, state: DriverState, *, keep: int) -> None:
    """Save all learners, then the marker; keep the latest `keep` complete checkpoints."""
    state.tag = f"step{state.step:06d}"
    ray.get([l.save.remote(str(grpo_learners_dir(run_dir)), state.tag, {"version": state.version, "step": state.step}) for l in learners])
    marker = grpo_marker(run_dir, state.tag)
    tmp = marker.with_name(f".{marker.name}.tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(state)))
    tmp.replace(marker)  # the marker makes the checkpoint complete
    for old in [c for c in find_checkpoints(run_dir) if c.kind == "grpo"][:-keep]:
        grpo_marker(run_dir, old.tag).unlink()  # incomplete first, then the learners' files
        shutil.rmtree(old.path, ignore_errors=True)


def resume(ray, learners: list, run_dir: Path) -> DriverState | None:
    """Load the newest complete GRPO checkpoint that loads into every learner; one that does not (a
    truncated file) is skipped with a line saying which and why. None: nothing to resume from."""
    for ckpt in reversed([c for c in find_checkpoints(run_dir) if c.kind == "grpo"]):
        state = DriverState(**grpo_state(ckpt))
        try:
            ray.get([l.load.remote(str(grpo_learners_dir(run_dir)), state.tag, state.version) for l in learners])
            return state
        except Exception as e:  # a damaged checkpoint: fall back to the one before it
            cause = str(getattr(e, "cause", None) or e).strip().splitlines()
            print(f"grpo: checkpoint {ckpt.path} does not load, skipped ({cause[-1][:300] if cause else type(e).__name__})", flush=True)
    return None
