"""SIGTERM as a clean stop. `ray job stop` sends SIGTERM to the job's entrypoint (a `sputnik`
command) and SIGKILL `RAY_JOB_STOP_WAIT_TIME_S` seconds later; raising `Stopped` in the main thread
unwinds every `with` block like Ctrl-C does, so metrics.jsonl is flushed and the W&B run finished.
`ray.init` installs Ray's own SIGTERM handler (which aborts the process), so `init_ray` installs
this one again after it.

Test: `pytest tests/orchestrator/test_orch_grpo.py -k sigterm`.
"""

from __future__ import annotations

import signal
import threading


class Stopped(KeyboardInterrupt):
    """The process received SIGTERM."""


def _stop(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Stopped()


def stop_on_sigterm() -> None:
    """Make SIGTERM raise `Stopped` in the main thread (a no-op elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
