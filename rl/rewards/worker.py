"""Killable worker processes for reward code that may hang, crash or explode: math-verify
(rl/rewards/math.py) and researchers' reward files (rl/rewards/registry.py).

`WorkerPool(module_file, function, processes=N)` keeps N processes, each running
`function(request, state)` of `module_file` for one request at a time; `call(request, timeout_s)`
returns its reply or raises WorkerFailed ("timed out after ...", "raised ...", "died ...").
A timeout kills the process group (a thread could not be stopped and would hold the pool's slot
for good: issue #17); the next call starts a fresh process, and the start-up (imports, the
optional `warm` function) never counts against a call's time.

The processes are started with subprocess as `python -c` loading `module_file` by path, never by
multiprocessing's spawn, which re-imports the caller's `__main__`: a plain script without
`if __name__ == "__main__"` ran itself again in the child and scored 0 (issue #17).
Requests and replies are pickles over a pair of pipes (both sides are our code or the
researcher's, never the policy's). Each process dies with its parent (PR_SET_PDEATHSIG).

Test: `pytest tests/rl/test_rewards_registry.py tests/rl/test_math_reward.py`.
"""

from __future__ import annotations

import io
import os
import pickle
import queue
import select
import signal
import struct
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds the rl package


class WorkerFailed(Exception):
    """A call did not return a reply: it timed out, raised, or the process died."""

    def __init__(self, message: str, *, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


def _send(fd: int, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(struct.pack(">Q", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _recv(fd: int, deadline: float | None = None):
    """The next message; TimeoutError past `deadline` (monotonic), EOFError when the writer is gone."""
    buf = io.BytesIO()
    need, size = 8, None
    while True:
        while buf.tell() < need:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise TimeoutError
            chunk = os.read(fd, min(need - buf.tell(), 1 << 20))
            if not chunk:
                raise EOFError
            buf.write(chunk)
        if size is not None:
            return pickle.loads(buf.getvalue()[8:])
        (size,) = struct.unpack(">Q", buf.getvalue())
        need = 8 + size


class WorkerProcess:
    """One process serving `function(request, state)` from `module_file`; not thread-safe (a pool's)."""

    def __init__(self, module_file: str, function: str, *, warm: str | None = None, quiet: bool = False, start_timeout_s: float = 120):
        self.module_file, self.function, self.warm, self.quiet = module_file, function, warm, quiet
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.to_fd = self.from_fd = -1

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.kill()
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        code = (f"import sys; sys.path.insert(1, {_ROOT!r}); import importlib.util as u; "
                f"s = u.spec_from_file_location('_sputnik_worker', {os.path.abspath(__file__)!r}); m = u.module_from_spec(s); "
                f"s.loader.exec_module(m); m._main({self.module_file!r}, {self.function!r}, {self.warm!r}, {req_r}, {rep_w})")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL if self.quiet else None,
                stderr=subprocess.DEVNULL if self.quiet else None, pass_fds=(req_r, rep_w), start_new_session=True)
        finally:
            os.close(req_r)
            os.close(rep_w)
        self.to_fd, self.from_fd = req_w, rep_r
        try:
            ready = _recv(self.from_fd, time.monotonic() + self.start_timeout_s)
        except (TimeoutError, EOFError, pickle.UnpicklingError):
            ready = None
        if ready != ("ready",):
            self.kill()
            raise WorkerFailed(f"the worker process for {os.path.basename(self.module_file)} did not start"
                               + (f": {ready[1]}" if isinstance(ready, tuple) and len(ready) == 2 else ""))

    def call(self, request, timeout_s: float):
        self.start()
        try:
            _send(self.to_fd, request)
            kind, value = _recv(self.from_fd, time.monotonic() + timeout_s)
        except TimeoutError:
            self.kill()
            raise WorkerFailed(f"timed out after {timeout_s:g} s", timed_out=True) from None
        except (EOFError, OSError, pickle.UnpicklingError):
            rc = self.proc.wait(timeout=5) if self.proc is not None else None
            self.kill()
            raise WorkerFailed(f"the worker process died (exit status {rc})") from None
        if kind == "ok":
            return value
        raise WorkerFailed(value)

    def kill(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the reward may have started children of its own
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            self.proc = None
        for fd in (self.to_fd, self.from_fd):
            if fd >= 0:
                os.close(fd)
        self.to_fd = self.from_fd = -1


class WorkerPool:
    """`processes` WorkerProcesses shared by threads: a call waits for a free one."""

    def __init__(self, module_file: str, function: str, *, processes: int, warm: str | None = None, quiet: bool = False, eager: bool = False):
        self._all = [WorkerProcess(module_file, function, warm=warm, quiet=quiet) for _ in range(processes)]
        self._free: queue.Queue[WorkerProcess] = queue.Queue()
        for w in self._all:
            if eager:
                w.start()
            self._free.put(w)

    def call(self, request, timeout_s: float):
        worker = self._free.get()
        try:
            return worker.call(request, timeout_s)
        finally:
            self._free.put(worker)

    def close(self) -> None:
        for w in self._all:
            w.kill()


def _main(module_file: str, function: str, warm: str | None, read_fd: int, write_fd: int) -> None:
    """The worker process: serve requests until the parent closes the pipe."""
    import ctypes
    import importlib.util
    import traceback

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the parent
        if os.getppid() == 1:  # the parent died before that took effect
            os._exit(1)
    except (OSError, AttributeError):  # not Linux
        pass
    try:
        spec = importlib.util.spec_from_file_location(f"_sputnik_worker_{os.path.basename(module_file)[:-3]}", module_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        handler = getattr(module, function)
        if warm:
            getattr(module, warm)()
    except Exception as e:
        _send(write_fd, ("error", f"{type(e).__name__}: {e}"))
        os._exit(1)
    _send(write_fd, ("ready",))
    state: dict = {}
    while True:
        try:
            request = _recv(read_fd)
        except EOFError:
            os._exit(0)
        try:
            reply = ("ok", handler(request, state))
            pickle.dumps(reply)
        except Exception as e:  # the reward's error, reported with the line it came from
            tb = traceback.extract_tb(e.__traceback__)
            where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
            reply = ("raised", f"raised {type(e).__name__}: {str(e)[:300]}{where}")
        _send(write_fd, reply)
