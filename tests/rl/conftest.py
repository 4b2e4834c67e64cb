"""Fixtures shared by the reward and sandbox tests."""

import os

import pytest

from rl.sandbox.host import _UID_BASE, _UID_RANGE


def _sandbox_pids() -> list[int]:
    """Pids of processes running as a sandbox uid (none may outlive a run)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
        except FileNotFoundError:
            continue
        if _UID_BASE <= uid < _UID_BASE + _UID_RANGE:
            pids.append(int(pid))
    return pids


@pytest.fixture(scope="session")
def sandbox_pids():
    """A function listing the processes that run as a sandbox uid."""
    return _sandbox_pids
