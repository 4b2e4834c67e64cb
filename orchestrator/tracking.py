"""Metrics tracking: one place that writes metrics.jsonl and Weights & Biases, plus progress bars.

`Tracker(run_dir, cfg.tracking, name=..., config=...)` appends one JSON object per logged step to
`run_dir/metrics.jsonl` (always with `step` and `time`, seconds since the tracker started) and
mirrors it to W&B; `should_log(step, last)` says which steps a loop logs (`tracking.log_every`).
W&B runs offline unless the config says online, and its files live inside the run directory. The
API key is read by wandb itself from the environment or netrc; nothing here prints or saves it.

Test: `pytest tests/orchestrator/test_orch_tracking.py`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from orchestrator.config import TrackingConfig


class Tracker:
    def __init__(
        self,
        run_dir: Path,
        cfg: TrackingConfig,
        *,
        name: str,
        config: Mapping[str, Any] | None = None,
        job_type: str | None = None,
        group: str | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.t0 = time.time()
        self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self.wandb_run = None
        if cfg.wandb_mode != "disabled":
            self.wandb_run = _start_wandb(self.run_dir, cfg, name=name, config=config, job_type=job_type,
                                          group=cfg.group or group or name)

    def drop_after(self, step: int) -> int:
        """Forget records past `step` (a run resumed from its checkpoint at `step` logs them again):
        metrics.jsonl keeps one record per step. Returns how many were dropped."""
        path = self.run_dir / "metrics.jsonl"
        self._file.close()
        lines = path.read_text().splitlines() if path.exists() else []
        keep = [l for l in lines if l.strip() and json.loads(l).get("step", 0) <= step]
        path.write_text("".join(l + "\n" for l in keep))
        self._file = open(path, "a", buffering=1)
        return len(lines) - len(keep)

    def should_log(self, step: int, last: int) -> bool:
        """Whether a loop ending at step `last` logs `step`: every `tracking.log_every` steps and the last."""
        return step % self.cfg.log_every == 0 or step == last

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """One record: scalars go to metrics.jsonl and W&B; W&B media objects go to W&B only."""
        record = {"step": int(step), "time": round(time.time() - self.t0, 3)}
        media = {}
        for k, v in metrics.items():
            scalar = _scalar(v)
            if scalar is not None:
                record[k] = scalar
            else:
                media[k] = v
        self._file.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({**{k: v for k, v in record.items() if k != "step"}, **media}, step=int(step))

    def table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """Rows for reading (sample rollouts): `<name>.jsonl` in the run directory and a W&B Table."""
        with open(self.run_dir / f"{name}.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps(dict(zip(columns, row)), default=str) + "\n")
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({name: wandb.Table(columns=columns, data=rows)}, step=int(step))

    def histograms(self, values: Mapping[str, list[float]], step: int) -> None:
        """Distributions (response lengths, rewards) as W&B histograms; nothing without W&B."""
        if self.wandb_run is not None and values:
            import wandb

            self.wandb_run.log({k: wandb.Histogram(list(v)) for k, v in values.items() if len(v)}, step=int(step))

    def summary(self, figures: Mapping[str, Any]) -> None:
        """Final figures: `summary.json` in the run directory (merged with earlier ones) and W&B."""
        path = self.run_dir / "summary.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        old.update(figures)
        path.write_text(json.dumps(old, indent=2, default=str) + "\n")
        if self.wandb_run is not None:
            for k, v in figures.items():
                self.wandb_run.summary[k] = v

    def close(self) -> None:
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _scalar(v: Any) -> float | int | str | bool | None:
    if isinstance(v, bool) or isinstance(v, str):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if hasattr(v, "item") and getattr(v, "numel", lambda: getattr(v, "size", 2))() == 1:
        return _scalar(v.item())
    return None


def wandb_group(run_dir: Path) -> str | None:
    """The W&B group of a run directory, or of the run holding it (`RUN/hf`): a GRPO or eval run
    joins the group of the run it starts from. None when there is none."""
    if not run_dir:
        return None
    for d in (Path(run_dir), Path(run_dir).parent):
        if (d / "wandb-group").is_file():
            return (d / "wandb-group").read_text().strip()
    return None


def _start_wandb(run_dir: Path, cfg: TrackingConfig, *, name, config, job_type, group):
    import wandb

    # Offline unless the user asked for online; never prompt for a login. A run directory keeps
    # its W&B run id, so a resumed run continues the same W&B run.
    os.environ.setdefault("WANDB_SILENT", "true")
    settings = wandb.Settings(silent=True, console="off")  # system metrics (CPU, memory, GPU) stay on
    id_file = run_dir / "wandb-run-id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    (run_dir / "wandb-group").write_text(group + "\n")
    return wandb.init(
        id=run_id,
        resume="allow",
        group=group,
        project=cfg.project,
        entity=cfg.entity,
        name=name,
        job_type=job_type,
        tags=list(cfg.tags),
        config=dict(config or {}),
        dir=str(run_dir),
        mode=cfg.wandb_mode,
        settings=settings,
        reinit="create_new",
    )


def progress(iterable: Iterable, *, total: int | None = None, description: str = "") -> Iterator:
    """A rich progress bar on a terminal; silent (plain iteration) when stdout is not a TTY."""
    if not sys.stdout.isatty() or os.environ.get("SPUTNIK_NO_PROGRESS"):
        yield from iterable
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total if total is not None else _len(iterable))
        for item in iterable:
            yield item
            bar.advance(task)


def _len(it: Iterable) -> int | None:
    try:
        return len(it)  # type: ignore[arg-type]
    except TypeError:
        return None
