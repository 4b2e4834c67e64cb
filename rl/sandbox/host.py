"""The host side of the code sandbox (the evaluator's process): `run_tests`, `run_program` and
`isolation()`, the isolation modes and the probe that picks the strongest, starting the children
(rl/sandbox/program.py, rl/sandbox/harness.py) with their limits and the run's cgroups
(rl/sandbox/cgroups.py), reading their pipes under a cap, ending the program's pid namespace and
process groups at the deadline, and turning the harness's verdict into a status. The design and
threat model are in rl/sandbox/__init__.py.

Test: `pytest tests/rl/test_sandbox_attacks.py tests/rl/test_reward_gaming.py tests/rl/test_io_tests.py`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import secrets
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from rl.sandbox.cgroups import _Cgroups
from rl.sandbox.program import _SECCOMP_ARCH

log = logging.getLogger(__name__)

_KEEP = 64 * 1024  # bytes of stdout / stderr kept in the result
_DRAIN = 4 * 1024 * 1024  # bytes read from a stream before its pipe is closed on the writer
_UID_BASE, _UID_RANGE = 1_700_000_000, 1 << 24  # per-run uid, so RLIMIT_NPROC is per run


@dataclass
class TestResult:
    """What `run_tests` found; `passed` is decided by the trusted harness, never by the program."""

    __test__ = False  # not a pytest test class

    passed: bool
    status: str  # passed | failed | error | timeout | killed
    duration_s: float
    stdout: str  # the program's, truncated to _KEEP bytes
    stderr: str
    isolation: str  # "full: ..." or "reduced: ..."
    detail: str = ""  # one line: why it failed
    tests_passed: int = 0  # checks that held (asserts, unittest tests)
    tests_total: int = 0  # checks executed, at least the number of asserts written in the tests
    memory_peak_mb: float | None = None  # the program's whole process tree, where a cgroup measured it


class IsolationError(RuntimeError):
    """Full isolation is not available on this node and reduced isolation was not allowed."""


@dataclass(frozen=True)
class _Mode:
    name: str
    prefix: tuple[str, ...]  # command that wraps the program process
    jail: bool  # chroot + unprivileged uid (needs root)
    isolation: str


_MODES = (
    _Mode("jail", ("unshare", "--mount", "--uts", "--ipc", "--net", "--pid", "--fork", "--kill-child"), True,
          "full: network, pid, mount and IPC namespaces; read-only minimal root; unprivileged uid"),
    _Mode("userns", ("unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"), False,
          "reduced: network and pid namespaces only (not root: same uid, file system visible)"),
    _Mode("none", (), False, "reduced: no network namespace (unshare not permitted): same uid, file system and network visible"),
)


@dataclass(frozen=True)
class _Setup:
    """What this process can do, probed once: the strongest mode, the bound on the program's process
    tree, and for anything short of full isolation, what the node lacks."""

    mode: _Mode
    bound: object  # _Cgroups | "seccomp" | None
    lacks: str = ""  # what the node lacks for full isolation

    @property
    def full(self) -> bool:
        return self.mode.jail and self.bound is not None

    @property
    def isolation(self) -> str:
        tree = {None: "no bound on the memory of the process tree",
                "seccomp": "no fork (seccomp), so memory_mb bounds the process tree"}.get(self.bound, f"process tree held to memory_mb by a cgroup ({getattr(self.bound, 'version', '')})")
        text = f"{self.mode.isolation}; {tree}"
        return text if self.full else "reduced: " + text.split(": ", 1)[1]


def run_tests(program: str, tests: str, *, timeout_s: float = 10, memory_mb: int = 1024, entry_point: str | None = None,
              isolation: str = "full") -> TestResult:
    """Run `program`, then `tests` (Python with asserts or unittest) against it; see the module docstring.

    With `entry_point`, tests that define `check(candidate)` without calling it (HumanEval's
    `test` field) get `check(<entry_point>)` appended. `isolation="full"` (the default) raises
    IsolationError where this node cannot isolate fully; "reduced" accepts the best it can.
    Thread-safe; each call takes two processes.
    """
    if timeout_s <= 0 or memory_mb < 64:
        raise ValueError(f"run_tests needs timeout_s > 0 and memory_mb >= 64 (got {timeout_s}, {memory_mb})")
    if entry_point is not None and not entry_point.isidentifier():
        raise ValueError(f"entry_point {entry_point!r} is not a Python identifier")
    setup = _checked_setup(isolation)
    return _run(program, tests, setup.mode, timeout_s, memory_mb, entry_point, setup.bound)


def _checked_setup(isolation: str) -> _Setup:
    """This node's setup for `isolation` ("full": IsolationError where the node cannot give it)."""
    if isolation not in ("full", "reduced"):
        raise ValueError(f"isolation must be 'full' or 'reduced' (got {isolation!r})")
    setup = _setup()
    if isolation == "full" and not setup.full:
        raise IsolationError(f"the code sandbox needs full isolation, which this node lacks: {setup.lacks}")
    return setup


def isolation() -> tuple[bool, str]:
    """(True, description) where `run_tests` isolates fully on this node, else (False, what the
    node lacks). Probed once per process (a few trivial programs)."""
    setup = _setup()
    return (True, setup.isolation) if setup.full else (False, setup.lacks or "full isolation")


@dataclass
class ProgramRun:
    """What `run_program` saw: the program's exit and its complete stdout (up to the limit)."""

    status: str  # ok (exit status 0) | error (another exit status) | timeout | killed | output_limit
    exit_code: int | None
    stdout: str  # all of it when status is not output_limit
    stderr: str  # truncated to _KEEP bytes
    duration_s: float
    isolation: str
    detail: str = ""
    memory_peak_mb: float | None = None


def run_program(program: str, stdin: str = "", *, timeout_s: float = 10, memory_mb: int = 1024, output_limit: int = 1 << 20,
                isolation: str = "full") -> ProgramRun:
    """Run `program` as a script (`__name__ == "__main__"`) with `stdin` as its standard input, in the
    same jail, limits and process-tree bound as `run_tests`' program process; return its exit and
    its stdout. One process, no harness: the caller (trusted) judges the output, so nothing the
    program does decides a verdict. More than `output_limit` bytes of stdout end the run
    (status output_limit: the pipe is closed, the program killed). Thread-safe."""
    if timeout_s <= 0 or memory_mb < 64 or output_limit < 1:
        raise ValueError(f"run_program needs timeout_s > 0, memory_mb >= 64 and output_limit >= 1 (got {timeout_s}, {memory_mb}, {output_limit})")
    setup = _checked_setup(isolation)
    return _run_program(program, stdin, setup.mode, timeout_s, memory_mb, output_limit, setup.bound)


def _run_program(program: str, stdin: str, mode: _Mode, timeout_s: float, memory_mb: int, output_limit: int, bound=None) -> ProgramRun:
    import threading

    start = time.monotonic()
    deadline = start + timeout_s
    limits = {"cpu_s": math.ceil(timeout_s) + 1, "memory_mb": memory_mb}
    uid = _UID_BASE + secrets.randbelow(_UID_RANGE) if mode.jail else None
    work = tempfile.mkdtemp(prefix="sputnik-sandbox-")
    cgroups: list[str] = []
    procs: list[subprocess.Popen] = []
    child_fds: list[int] = []
    streams: list[_Stream] = []
    feeder = None
    try:
        if isinstance(bound, _Cgroups):
            cgroups += bound.create(memory_mb)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        child_fds += [out_w, err_w]
        out = _Stream(open(out_r, "rb", buffering=0), keep=output_limit + 1, drain=output_limit + 1)
        err = _Stream(open(err_r, "rb", buffering=0))
        streams += [out, err]
        cfg = {"role": "stdio", "jail": mode.jail, "uid": uid, "limits": limits, "fds": [out_w, err_w], "cgroups": cgroups,
               "no_fork": bound == "seccomp"}
        procs.append(subprocess.Popen(
            [*mode.prefix, sys.executable, "-I", "-S", "-c", _child_bootstrap("program"), json.dumps(cfg)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(out_w, err_w), cwd="/" if mode.jail else work, env=_env(work),
            start_new_session=True))
        prog = procs[0]
        while child_fds:
            os.close(child_fds.pop())
        startup = _Stream(prog.stdout)
        streams.append(startup)
        source = program.encode("utf-8", "surrogatepass")
        # a thread writes stdin: a program that never reads its input must not block us
        feeder = threading.Thread(target=_feed, args=(prog, struct.pack(">Q", len(source)) + source + stdin.encode("utf-8", "surrogatepass")), daemon=True)
        feeder.start()
        closed = _collect(streams, out, deadline)  # until the program closes its stdout (exit, or output_limit)
        try:
            prog.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        rc = prog.poll()
        if mode.prefix:
            _end_namespace(prog)
        _kill(procs)
        for s in streams:
            s.drain()
        peak_mb, ooms = _Cgroups.usage(cgroups)
        if out.seen > output_limit:
            status, detail = "output_limit", f"the program wrote more than {output_limit} bytes to stdout"
        elif not closed or rc is None:
            status, detail = "timeout", f"the program did not finish within {timeout_s:g} s"
        elif rc < 0:
            status, detail = "killed", f"killed by {signal.Signals(-rc).name}"
        elif rc:
            status, detail = "error", f"exit status {rc}: {_last_line(_text(err.data) or _text(startup.data))}"
        else:
            status, detail = "ok", ""
        if ooms and status != "ok":
            detail += f" (the program's processes hit memory_mb = {memory_mb} {ooms} time(s))"
        return ProgramRun(status=status, exit_code=rc, stdout=_text(out.data[:output_limit]), stderr=_text(err.data, err.seen),
                          duration_s=time.monotonic() - start, isolation=_Setup(mode, bound).isolation, detail=detail,
                          memory_peak_mb=peak_mb)
    finally:
        _kill(procs)
        if feeder is not None:  # the program is dead: a blocked write ends with EPIPE
            feeder.join(timeout=2)
        for p in procs:
            for f in (p.stdin, p.stdout):
                try:
                    f.close()
                except OSError:  # a broken pipe's buffered bytes
                    pass
        for s in streams:
            s.file.close()
        for fd in child_fds:
            os.close(fd)
        _Cgroups.remove(cgroups)
        shutil.rmtree(work, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def _setup() -> _Setup:
    """The strongest isolation that works here, probed once per process with a trivial program."""
    lacks = []
    for mode in _MODES:
        if mode.jail and os.geteuid() != 0:
            lacks.append(f"root (the evaluator runs as uid {os.geteuid()}; the jail needs root to mount, chroot and change uid)")
            continue
        if mode.prefix and shutil.which(mode.prefix[0]) is None:
            if mode.jail:
                lacks.append("the `unshare` command (util-linux)")
            continue
        bound = _bound(mode)
        probe = _run("x = 1", "assert x == 1", mode, 30, 256, None, bound)
        if probe.passed:
            if mode.jail and bound is None:
                lacks.append("a bound on the program's process tree (no writable memory cgroup, and seccomp is not supported on this CPU)")
            setup = _Setup(mode, bound, "; ".join(lacks))
            if not setup.full:
                log.warning("code sandbox isolation is %s (lacks: %s)", setup.isolation, setup.lacks)
            return setup
        if mode.jail:
            lacks.append(f"a working jail ({probe.status}: {probe.detail or probe.stderr[-200:]})".replace("\n", " "))
        log.info("code sandbox: mode %s does not work here (%s: %s)", mode.name, probe.status, probe.detail or probe.stderr[-300:])
    raise RuntimeError(f"the code sandbox cannot run even unisolated: {probe.status}: {probe.detail or probe.stderr[-300:]}")


def _bound(mode: _Mode):
    """How the program's whole process tree is held to memory_mb: a cgroup (needs root), else a
    seccomp filter that forbids fork so the tree is one process, else nothing."""
    if mode.jail:
        cgroups = _Cgroups.find()
        if cgroups is not None:
            return cgroups
    return "seccomp" if os.uname().machine in _SECCOMP_ARCH else None


def _env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}


def _child_bootstrap(module: str) -> str:
    """`python -c` code that runs `module` ("program" or "harness", a file of this package) as
    __main__ from its cached bytecode (faster than running the file as a script, which recompiles
    it). By its bare name from this directory, so that the child imports neither `rl` nor this
    package's __init__ (the host side): the standard library only, and a fast start. This directory
    comes first on the child's sys.path while it starts: no file here may share a stdlib module's name."""
    here = os.path.dirname(os.path.abspath(__file__))
    return f"import runpy, sys; sys.path.insert(0, {here!r}); runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"


def _run(program: str, tests: str, mode: _Mode, timeout_s: float, memory_mb: int, entry_point: str | None, bound=None) -> TestResult:
    start = time.monotonic()
    deadline = start + timeout_s
    token = secrets.token_hex(16)
    limits = {"cpu_s": math.ceil(timeout_s) + 1, "memory_mb": memory_mb}
    uid = _UID_BASE + secrets.randbelow(_UID_RANGE) if mode.jail else None
    work = tempfile.mkdtemp(prefix="sputnik-sandbox-")
    cgroups: list[str] = []
    procs: list[subprocess.Popen] = []
    child_fds: list[int] = []
    streams: list[_Stream] = []
    try:
        if isinstance(bound, _Cgroups):
            cgroups += bound.create(memory_mb)
        prog_dir, harness_dir = os.path.join(work, "program"), os.path.join(work, "harness")
        os.mkdir(prog_dir)
        os.mkdir(harness_dir)
        req_r, req_w = os.pipe()  # harness -> program
        resp_r, resp_w = os.pipe()  # program -> harness
        verdict_r, verdict_w = os.pipe()  # harness -> us
        out_r, out_w = os.pipe()  # the program's own stdout and stderr (not unshare's)
        err_r, err_w = os.pipe()
        child_fds += [req_r, req_w, resp_r, resp_w, verdict_w, out_w, err_w]
        out, err, verdict = (_Stream(open(fd, "rb", buffering=0)) for fd in (out_r, err_r, verdict_r))
        streams += [out, err, verdict]
        python = [sys.executable, "-I", "-S", "-c"]
        prog_cfg = {"role": "program", "jail": mode.jail, "uid": uid, "limits": limits, "fds": [req_r, resp_w, out_w, err_w],
                    "cgroups": cgroups, "no_fork": bound == "seccomp"}
        procs.append(subprocess.Popen(
            [*mode.prefix, *python, _child_bootstrap("program"), json.dumps(prog_cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, pass_fds=(req_r, resp_w, out_w, err_w), cwd="/" if mode.jail else prog_dir, env=_env(prog_dir),
            start_new_session=True))
        harness_cfg = {"role": "harness", "limits": limits, "fds": [resp_r, req_w, verdict_w], "protect": not mode.jail}
        procs.append(subprocess.Popen(
            [*python, _child_bootstrap("harness"), json.dumps(harness_cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, pass_fds=(resp_r, req_w, verdict_w), cwd=harness_dir, env=_env(harness_dir), start_new_session=True))
        prog, harness = procs
        while child_fds:  # only the children hold these now, so EOF means a child is gone
            os.close(child_fds.pop())
        startup, harness_out = _Stream(prog.stdout), _Stream(harness.stdout)  # unshare's and the bootstrap's messages
        streams += [startup, harness_out]
        _feed(prog, program.encode("utf-8", "surrogatepass"))
        _feed(harness, json.dumps({"tests": tests, "entry_point": entry_point, "token": token}).encode())
        timed_out = not _collect(streams, verdict, deadline)
        report = _parse_verdict(bytes(verdict.data), token)
        if not timed_out and report is not None and report["status"] == "lost":
            try:  # let the program's own end (a signal or an exit) show in its status
                prog.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
        prog_rc = prog.poll()  # before we kill it: None while it runs
        if mode.prefix:
            _end_namespace(prog)
        _kill(procs)
        for s in streams:
            s.drain()
        status, detail = _status(timed_out, report, prog_rc, _text(startup.data), _text(harness_out.data), timeout_s)
        peak_mb, ooms = _Cgroups.usage(cgroups)
        if ooms and status != "passed":
            detail += f" (the program's processes hit memory_mb = {memory_mb} {ooms} time(s))"
        return TestResult(
            passed=status == "passed", status=status, duration_s=time.monotonic() - start,
            stdout=_text(out.data, out.seen), stderr=_text(err.data, err.seen), isolation=_Setup(mode, bound).isolation,
            detail=detail, tests_passed=report.get("passed", 0) if report else 0, tests_total=report.get("total", 0) if report else 0,
            memory_peak_mb=peak_mb)
    finally:
        _kill(procs)
        for p in procs:
            for f in (p.stdin, p.stdout):
                f.close()
        for s in streams:
            s.file.close()
        for fd in child_fds:
            os.close(fd)
        _Cgroups.remove(cgroups)
        shutil.rmtree(work, ignore_errors=True)


class _Stream:
    """A pipe from a child: keeps the first _KEEP bytes; the pipe is closed after _DRAIN bytes, so a
    program printing without end gets EPIPE instead of costing the parent CPU."""

    def __init__(self, file, keep: int = _KEEP, drain: int = _DRAIN):
        self.file, self.data, self.seen, self.keep, self.limit = file, bytearray(), 0, keep, drain

    def read(self) -> bool:
        """Read once; False at EOF or when drained (the caller then closes the pipe)."""
        chunk = os.read(self.file.fileno(), 65536)
        self.seen += len(chunk)
        self.data += chunk[: max(0, self.keep - len(self.data))]
        return bool(chunk) and self.seen < self.limit

    def drain(self) -> None:
        """Read what is left without blocking (the writers are dead, or escaped and ignored)."""
        if self.file.closed:
            return
        os.set_blocking(self.file.fileno(), False)
        try:
            while self.read():
                pass
        except BlockingIOError:
            pass
        self.file.close()


def _feed(proc: subprocess.Popen, data: bytes) -> None:
    """Write a child's stdin and close it; the child reads it first thing, or has died."""
    try:
        proc.stdin.write(data)
        proc.stdin.close()
    except BrokenPipeError:
        pass


def _collect(streams: list[_Stream], verdict: _Stream, deadline: float) -> bool:
    """Read every stream until the verdict pipe closes (True) or the deadline passes (False)."""
    with selectors.DefaultSelector() as sel:
        for s in streams:
            sel.register(s.file, selectors.EVENT_READ, s)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for key, _ in sel.select(timeout=remaining):
                s = key.data
                if not s.read():
                    sel.unregister(s.file)
                    s.file.close()
                    if s is verdict:
                        return True


def _end_namespace(unshare: subprocess.Popen) -> None:
    """SIGKILL the pid namespace's init (unshare's child) first: the kernel kills everything else in
    the namespace before init's exit completes, and unshare reaps init — nothing is left, not even a
    zombie. (Killing unshare first would orphan the dying init to the host's init.)"""
    try:
        with open(f"/proc/{unshare.pid}/task/{unshare.pid}/children") as f:
            children = [int(pid) for pid in f.read().split()]
    except (OSError, ValueError):  # already gone, or a kernel without the children file
        return
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        unshare.wait(timeout=2)
    except subprocess.TimeoutExpired:
        pass


def _kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each child's process group (the program's pid namespace dies with its init)."""
    for p in procs:
        if p.returncode is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=2)
        except subprocess.TimeoutExpired:
            log.warning("sandbox process %d survived SIGKILL for 2 s", p.pid)


def _parse_verdict(data: bytes, token: str) -> dict | None:
    try:
        report = json.loads(data)
    except ValueError:
        return None
    if not isinstance(report, dict) or report.get("token") != token:
        return None
    return report


def _status(timed_out: bool, report: dict | None, prog_rc: int | None, startup: str, harness_out: str, timeout_s: float) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"no verdict within {timeout_s:g} s"
    if report is None:
        return "killed", "the test harness died: " + _last_line(harness_out)
    if report["status"] == "lost":
        if prog_rc is not None and prog_rc < 0:
            return "killed", f"{report['detail']} (killed by {signal.Signals(-prog_rc).name})"
        if prog_rc:  # the bootstrap or unshare failed, before the program ran
            return "error", f"{report['detail']} (exit status {prog_rc}: {_last_line(startup)})"
        return "error", report["detail"] + (" (exit status 0)" if prog_rc == 0 else "")
    return report["status"], report["detail"]


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no output"


def _text(data: bytes | bytearray, seen: int | None = None) -> str:
    text = bytes(data).decode("utf-8", "replace")
    if seen is not None and seen > len(data):
        text += f"\n[... {seen - len(data)} more bytes not kept]"
    return text
