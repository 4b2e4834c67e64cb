"""Per-run cgroups of the code sandbox (issue #17): where root can write a memory cgroup (v2, or
v1's memory and pids hierarchies), they hold the program's whole process tree to memory_mb and
_PIDS tasks. The host side (rl/sandbox/host.py) finds, creates, measures and removes them; the
program process joins them itself (rl/sandbox/program.py). The design is in rl/sandbox/__init__.py.

Test: `pytest tests/rl/test_reward_gaming.py`.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import time

log = logging.getLogger(__name__)

_PIDS = 64  # tasks (processes and threads) in one run's cgroup


class _Cgroups:
    """Per-run cgroups that hold the program's whole process tree to memory_mb and _PIDS tasks
    (issue #17: rlimits are per process, so a program that forks could hold processes x memory_mb).

    cgroup v2: a child of the nearest cgroup (ours or an ancestor) that delegates the memory and pids
    controllers to its children; v1: children of our memory and pids cgroups. The program process
    joins them itself (it writes "0" to cgroup.procs before it chroots), so everything it starts is
    inside. Needs root; cgroups left by a dead evaluator are removed on the next probe."""

    def __init__(self, version: str, memory_dir: str, pids_dir: str | None):
        self.version, self.memory_dir, self.pids_dir = version, memory_dir, pids_dir

    @staticmethod
    def find() -> _Cgroups | None:
        if os.geteuid() != 0:
            return None
        try:
            with open("/proc/self/cgroup") as f:
                own = {c: path for _, ctls, path in (line.rstrip("\n").split(":", 2) for line in f) for c in ctls.split(",")}
            with open("/proc/self/mountinfo") as f:
                mounts = [line.split() for line in f]
        except OSError:
            return None
        v1, v2 = {}, None
        for m in mounts:
            fstype = m[m.index("-") + 1]
            if fstype == "cgroup2" and v2 is None:
                v2 = (m[3], m[4])  # (root inside the hierarchy, mount point)
            elif fstype == "cgroup":
                for ctl in m[-1].split(","):
                    v1.setdefault(ctl, (m[3], m[4]))

        def located(root_mount, path):
            root, mount = root_mount
            rel = path[len(root):] if root != "/" and path.startswith(root) else path
            return os.path.normpath(mount + "/" + rel.lstrip("/"))

        found = None
        if "memory" in v1 and "memory" in own:
            pids = located(v1["pids"], own["pids"]) if "pids" in v1 and "pids" in own else None
            found = _Cgroups("v1", located(v1["memory"], own["memory"]), pids)
        elif v2 is not None and "" in own:
            d, top = located(v2, own[""]), v2[1]
            while True:  # the nearest cgroup whose children get the memory and pids controllers
                try:
                    with open(os.path.join(d, "cgroup.subtree_control")) as f:
                        if {"memory", "pids"} <= set(f.read().split()):
                            found = _Cgroups("v2", d, None)
                            break
                except OSError:
                    pass
                if os.path.normpath(d) == os.path.normpath(top):
                    break
                d = os.path.dirname(d)
        if found is None:
            return None
        found._sweep()
        try:
            found.remove(found.create(64))
        except OSError as e:
            log.info("code sandbox: cannot use cgroups under %s (%s)", found.memory_dir, e)
            return None
        return found

    def create(self, memory_mb: int) -> list[str]:
        """Make this run's cgroups; returns their directories (the program joins each)."""
        name = f"sputnik-sandbox-{os.getpid()}-{secrets.token_hex(6)}"
        limit = str(memory_mb << 20)
        made: list[str] = []
        try:
            d = os.path.join(self.memory_dir, name)
            os.mkdir(d)
            made.append(d)
            if self.version == "v2":
                _write(d, "memory.max", limit)
                _write(d, "memory.swap.max", "0", missing_ok=True)
                _write(d, "pids.max", str(_PIDS))
            else:
                _write(d, "memory.limit_in_bytes", limit)
                _write(d, "memory.memsw.limit_in_bytes", limit, missing_ok=True)
                if self.pids_dir is not None:
                    d = os.path.join(self.pids_dir, name)
                    os.mkdir(d)
                    made.append(d)
                    _write(d, "pids.max", str(_PIDS))
        except OSError:
            _Cgroups.remove(made)
            raise
        return made

    @staticmethod
    def usage(dirs: list[str]) -> tuple[float | None, int]:
        """(peak memory in MiB of the run's process tree, times it hit the limit), where known."""
        for d in dirs:
            for peak_file, events in (("memory.peak", "memory.events"), ("memory.max_usage_in_bytes", "memory.oom_control")):
                try:
                    with open(os.path.join(d, peak_file)) as f:
                        peak = int(f.read()) / (1 << 20)
                    with open(os.path.join(d, events)) as f:
                        ooms = dict(line.split() for line in f if line.strip()).get("oom_kill", "0")
                    return peak, int(ooms)
                except (OSError, ValueError):
                    continue
        return None, 0

    @staticmethod
    def remove(dirs: list[str]) -> None:
        """Kill whatever is left in the cgroups and remove them (rmdir waits for the exits)."""
        deadline = time.monotonic() + 5
        for d in dirs:
            while True:
                try:
                    if os.path.exists(os.path.join(d, "cgroup.kill")):  # v2, Linux 5.14+
                        _write(d, "cgroup.kill", "1")
                    with open(os.path.join(d, "cgroup.procs")) as f:
                        for pid in f.read().split():
                            try:
                                os.kill(int(pid), signal.SIGKILL)
                            except ProcessLookupError:
                                pass
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:  # EBUSY while the killed processes finish exiting
                    if time.monotonic() > deadline:
                        log.warning("code sandbox: could not remove cgroup %s (%s); the next probe retries", d, e)
                        break
                    time.sleep(0.01)

    def _sweep(self) -> None:
        """Remove cgroups that an evaluator which has since died left behind."""
        for base in filter(None, (self.memory_dir, self.pids_dir)):
            try:
                names = os.listdir(base)
            except OSError:
                continue
            for name in names:
                parts = name.split("-")
                if len(parts) != 4 or parts[:2] != ["sputnik", "sandbox"] or not parts[2].isdigit():
                    continue
                try:
                    os.kill(int(parts[2]), 0)
                except ProcessLookupError:
                    _Cgroups.remove([os.path.join(base, name)])
                except PermissionError:
                    pass


def _write(directory: str, name: str, value: str, *, missing_ok: bool = False) -> None:
    try:
        with open(os.path.join(directory, name), "w") as f:
            f.write(value)
    except FileNotFoundError:
        if not missing_ok:
            raise
