"""SIGTERM as a clean stop. `ray job stop` sends SIGTERM to the job's entrypoint (a `sputnik`
command) and SIGKILL `RAY_JOB_STOP_WAIT_TIME_S` seconds later; raising `Stopped` in the main thread
unwinds every `with` block like Ctrl-C does, so metrics.jsonl is flushed and the W&B run finished.
`ray.init` installs Ray's own SIGTERM handler (which aborts the process), so `init_ray` installs
this one again after it.

Test: `pytest tests/orchestrator/test_orch_grpo.py -k sigterm tests/orchestrator/test_orch_stop.py`.
"""

from __future__ import annotations

import signal
import threading


class Stopped(KeyboardInterrupt):
    """The process received SIGTERM."""


# Set once SIGTERM arrived: a library that catches the KeyboardInterrupt and raises its own (Ray
# Train's fit does) loses the `Stopped` type, and `as_stopped` restores it.
_RECEIVED = threading.Event()


def _stop(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    _RECEIVED.set()
    raise Stopped()


def as_stopped(e: KeyboardInterrupt) -> KeyboardInterrupt:
    """`e`, or `Stopped` when the interrupt came from SIGTERM."""
    return Stopped() if _RECEIVED.is_set() and not isinstance(e, Stopped) else e


def stop_on_sigterm() -> None:
    """Make SIGTERM raise `Stopped` in the main thread (a no-op elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
