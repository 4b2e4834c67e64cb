"""Metrics tracking: one place that writes metrics.jsonl and Weights & Biases, plus progress bars.

`Tracker(run_dir, cfg.tracking, name=..., config=...)` appends one JSON object per logged step to
`run_dir/metrics.jsonl` (always with `step` and `time`, seconds since the tracker started) and
mirrors it to W&B; `should_log(step, last)` says which steps a loop logs (`tracking.log_every`).
W&B runs offline unless the config says online, and its files live inside the run directory. The
API key is read by wandb itself from the environment or netrc; nothing here prints or saves it.

Where the steps are computed in other processes (pretraining's rank 0 runs on any node),
`MetricsFollower` owns the W&B run: the workers write metrics.jsonl only and the follower sends each
new record to W&B, so a worker killed by `ray job stop` (or by a node loss) cannot take logged
steps with it. `start_follower` runs it as a process of its own outside the driver's process tree:
`ray job stop` sends SIGTERM to the driver and every descendant, wandb's service process
included, so a follower inside the driver would lose what that service had not written yet; the
detached follower finishes the run after the driver is gone (`python -m orchestrator.tracking
RUN_DIR`). `orchestrator.wandb_offline.offline_history(run_dir)` reads the steps back from the
offline run files (what `wandb sync` would upload).

Test: `pytest tests/orchestrator/test_orch_tracking.py tests/orchestrator/test_orch_stop.py`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

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
        followed: bool = False,
    ):
        """`followed`: a MetricsFollower in another process sends the records to W&B; once it has
        closed, `log` raises `FollowerClosed` instead of writing a record W&B would never get."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.followed = followed
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
        # a new file replaces the old one (a new inode): a MetricsFollower reading it starts over
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        os.replace(tmp, path)
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
        if self.followed:
            with _metrics_lock(self.run_dir):
                if (self.run_dir / MetricsFollower.CLOSED).exists():
                    raise FollowerClosed(f"{self.run_dir}: the driver stopped following metrics.jsonl (the run was stopped)")
                self._file.write(json.dumps(record) + "\n")
        else:
            self._file.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({**{k: v for k, v in record.items() if k != "step"}, **media}, step=int(step))

    def table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """Rows for reading (sample rollouts): `<name>.jsonl` in the run directory and a W&B Table.
        A followed tracker leaves the table to its follower (`wandb-media.jsonl`): log it before
        the step's metrics, which the follower sends it with."""
        with open(self.run_dir / f"{name}.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps(dict(zip(columns, row)), default=str) + "\n")
        if self.followed:
            self._media({"step": int(step), "table": name, "columns": columns, "rows": rows})
        elif self.wandb_run is not None:
            import wandb

            self.wandb_run.log({name: wandb.Table(columns=columns, data=rows)}, step=int(step))

    def histograms(self, values: Mapping[str, list[float]], step: int) -> None:
        """Distributions (response lengths, rewards) as W&B histograms; nothing without W&B (a
        followed tracker: through its follower, as `table`)."""
        values = {k: [float(x) for x in v] for k, v in values.items() if len(v)}
        if self.followed and values:
            self._media({"step": int(step), "histograms": values})
        elif self.wandb_run is not None and values:
            import wandb

            self.wandb_run.log({k: wandb.Histogram(v) for k, v in values.items()}, step=int(step))

    def _media(self, record: dict) -> None:
        with open(self.run_dir / MEDIA_FILE, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")

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


class FollowerClosed(RuntimeError):
    """A followed Tracker's driver is gone: nothing written now would reach W&B."""


@contextlib.contextmanager
def _metrics_lock(run_dir: Path):
    """An exclusive lock between a followed Tracker's writes and the follower's last read."""
    with open(Path(run_dir) / ".metrics.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class MetricsFollower:
    """The driver's W&B run for records that other processes append to `run_dir/metrics.jsonl`.

    A thread sends every new record to W&B every `poll_s`; `close()` (also on SIGTERM, through
    `with`) sends what is left and finishes the run. Its last read and the marker `CLOSED` happen
    under the lock the writers take (Tracker(followed=True)): a record is either sent or never
    written, so W&B holds every step in metrics.jsonl even when the workers outlive the driver. The last step sent is kept in
    `run_dir/wandb-step`, so a resumed run sends only later steps: the W&B run gets each step once
    even though the resumed workers log again the steps after their checkpoint. `media(step)`
    may add W&B objects to a step's record (pretraining's expert-load heatmap)."""

    STEP_FILE = "wandb-step"
    CLOSED = "metrics.closed"

    def __init__(self, run_dir: Path, cfg: TrackingConfig, *, name: str, config: Mapping[str, Any] | None = None,
                 job_type: str | None = None, group: str | None = None,
                 media: Callable[[int], Mapping[str, Any]] | None = None, poll_s: float = 0.5):
        self.run_dir, self.media, self.poll_s = Path(run_dir), media, poll_s
        self.path = self.run_dir / "metrics.jsonl"
        step_file = self.run_dir / self.STEP_FILE
        self.sent = int(step_file.read_text()) if step_file.is_file() else -1
        (self.run_dir / self.CLOSED).unlink(missing_ok=True)
        self._inode, self._offset = None, 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.wandb_run = _start_wandb(self.run_dir, cfg, name=name, config=config, job_type=job_type,
                                      group=cfg.group or group or name) if cfg.wandb_mode != "disabled" else None
        self._thread = None
        if self.wandb_run is not None:
            self.drain()  # what a stopped run wrote after its last send, before new workers rewrite it
            self._thread = threading.Thread(target=self._follow, name="metrics-follower", daemon=True)
            self._thread.start()

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.drain()

    def _new_records(self) -> list[dict]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return []
        if st.st_ino != self._inode or st.st_size < self._offset:  # Tracker.drop_after replaced it
            self._inode, self._offset = st.st_ino, 0
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # complete lines only; a partial last line is read next time
        self._offset += end
        records = []
        for line in data[:end].splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # a line cut by a crash: skip it
                continue
        return records

    def drain(self) -> int:
        """Send the records not sent yet (steps after the last one sent); returns how many."""
        with self._lock:
            if self.wandb_run is None:
                return 0
            n = 0
            for rec in self._new_records():
                step = int(rec.get("step", -1))
                if step <= self.sent:
                    continue
                extra = self.media(step) if self.media else {}
                self.wandb_run.log({**{k: v for k, v in rec.items() if k != "step"}, **extra}, step=step)
                self.sent, n = step, n + 1
            if n:
                (self.run_dir / self.STEP_FILE).write_text(f"{self.sent}\n")
            return n

    def summary(self, figures: Mapping[str, Any]) -> None:
        if self.wandb_run is not None:
            for k, v in figures.items():
                self.wandb_run.summary[k] = v

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with _metrics_lock(self.run_dir):
            self.drain()
            (self.run_dir / self.CLOSED).touch()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def __enter__(self) -> "MetricsFollower":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


MEDIA_FILE = "wandb-media.jsonl"


def followed_media(run_dir: Path) -> Callable[[int], dict]:
    """For MetricsFollower: the W&B tables and histograms a followed Tracker wrote for a step
    (`wandb-media.jsonl`, written before the step's metrics). A step logged again after a resume
    gets its latest media."""
    path, offset, pending = Path(run_dir) / MEDIA_FILE, 0, {}

    def media(step: int) -> dict:
        nonlocal offset
        import wandb

        if path.is_file():
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
            end = data.rfind(b"\n") + 1
            offset += end
            for line in data[:end].splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                pending.setdefault(rec["step"], {})
                if "table" in rec:
                    pending[rec["step"]][rec["table"]] = ("table", rec["columns"], rec["rows"])
                for k, v in rec.get("histograms", {}).items():
                    pending[rec["step"]][k] = ("histogram", v)
        for s in [s for s in pending if s < step]:  # steps never logged: nothing will ask for them
            del pending[s]
        out = {}
        for k, v in pending.pop(step, {}).items():
            out[k] = wandb.Table(columns=v[1], data=v[2]) if v[0] == "table" else wandb.Histogram(v[1])
        return out
    return media


FOLLOWER_SPEC, FOLLOWER_PID, FOLLOWER_STOP = "wandb-follower.json", "wandb-follower.pid", "wandb-follower.stop"


class FollowerProcess:
    """The driver's handle on a detached `python -m orchestrator.tracking RUN_DIR` (start_follower)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def stop(self, *, wait_s: float = 0) -> bool:
        """Ask the follower to send what is left and finish the W&B run; wait up to `wait_s` for it.
        Returns whether it has finished."""
        (self.run_dir / FOLLOWER_STOP).touch()
        return wait_follower(self.run_dir, wait_s)


def wait_follower(run_dir: Path, timeout_s: float) -> bool:
    """Wait until the run directory's follower has finished its W&B run; whether it has."""
    deadline = time.monotonic() + timeout_s
    pid_file = Path(run_dir) / FOLLOWER_PID
    while pid_file.exists():
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):  # removed meanwhile, or being written
            pid = None
        if pid is not None and not _alive(pid):  # a follower that was killed left its pid file
            pid_file.unlink(missing_ok=True)
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def start_follower(run_dir: Path, cfg: TrackingConfig, *, name: str, config: Mapping[str, Any] | None = None,
                   job_type: str | None = None, group: str | None = None,
                   media: str | None = None) -> FollowerProcess | None:
    """Start a MetricsFollower for `run_dir` in a process of its own, outside this process's tree
    (double fork, new session): it follows until this process ends or `stop()` is called, then
    finishes the W&B run. `media` names a "module:function" that, given the run directory, returns
    MetricsFollower's `media`. None (nothing started) when W&B is disabled."""
    import dataclasses
    import subprocess

    run_dir = Path(run_dir).resolve()
    if cfg.wandb_mode == "disabled":
        (run_dir / MetricsFollower.CLOSED).unlink(missing_ok=True)  # left by an earlier run with W&B
        return None
    wait_follower(run_dir, 60)  # a previous follower of this run directory (a resumed run) finishes first
    (run_dir / FOLLOWER_STOP).unlink(missing_ok=True)
    spec = {"tracking": dataclasses.asdict(cfg), "name": name, "config": dict(config or {}), "job_type": job_type,
            "group": group, "media": media, "driver_pid": os.getpid()}
    (run_dir / FOLLOWER_SPEC).write_text(json.dumps(spec, default=str))
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "orchestrator.tracking", str(run_dir)]
    # the intermediate process starts the follower in a new session and exits: the follower's parent
    # is then init, so neither `ray job stop` nor a terminal's Ctrl-C reaches it
    launcher = ("import subprocess, sys\n"
                "log = open(sys.argv[1], 'a')\n"
                "p = subprocess.Popen(sys.argv[2:], start_new_session=True, stdin=subprocess.DEVNULL, stdout=log, stderr=log)\n"
                "print(p.pid)\n")
    # its working directory is the run directory: a job's working directory is deleted when the job ends
    out = subprocess.run([sys.executable, "-c", launcher, str(run_dir / "wandb-follower.log"), *cmd], env=env, cwd=run_dir,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    (run_dir / FOLLOWER_PID).write_text(out.strip() + "\n")
    return FollowerProcess(run_dir)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def follow(run_dir: Path) -> None:
    """The detached follower's loop (start_follower): send new records until the driver is gone or
    asks to stop, then close (last records, W&B run finished) and remove the pid file."""
    import importlib

    run_dir = Path(run_dir)
    try:
        spec = json.loads((run_dir / FOLLOWER_SPEC).read_text())
        media = None
        if spec["media"]:
            module, func = spec["media"].split(":")
            media = getattr(importlib.import_module(module), func)(run_dir)
        follower = MetricsFollower(run_dir, TrackingConfig(**spec["tracking"]), name=spec["name"], config=spec["config"],
                                   job_type=spec["job_type"], group=spec.get("group"), media=media,
                                   poll_s=1e9)  # this loop drains
        try:
            while _alive(spec["driver_pid"]) and not (run_dir / FOLLOWER_STOP).exists():
                time.sleep(0.5)
                follower.drain()
        finally:
            if (run_dir / "summary.json").is_file():
                follower.summary(json.loads((run_dir / "summary.json").read_text()))
            follower.close()
            import wandb

            wandb.teardown()  # finish() can return before wandb's service has written the run file
    finally:
        (run_dir / FOLLOWER_PID).unlink(missing_ok=True)


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

    from orchestrator.ray_local import reenter_working_dir

    reenter_working_dir()  # wandb.init needs os.getcwd()
    # Offline unless the user asked for online; never prompt for a login. A run directory keeps
    # its W&B run id, so a resumed run continues the same W&B run.
    os.environ.setdefault("WANDB_SILENT", "true")
    # system metrics (CPU, memory, GPU) stay on; root_dir is the run directory, not the working
    # directory, which under `ray job submit --working-dir` Ray may delete while the job runs
    settings = wandb.Settings(silent=True, console="off", root_dir=str(run_dir))
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


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    follow(Path(sys.argv[1]))
