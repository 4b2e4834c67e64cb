"""The program process of the code sandbox (untrusted once the program runs), and the framing and
rlimits both children share. Standard library only: the children run under `python -I -S`, and the
host starts this file as __main__ by its bare name (host._child_bootstrap), so a child imports
neither `rl` nor the host side. Before the untrusted code: the run's cgroups, the jail (mount
namespace, read-only minimal root, private /tmp), rlimits, the run's uid and, where no cgroup bounds
the process tree, a seccomp filter that refuses fork. Then the program loads and answers the
harness's requests (role "program", `run_tests`), or runs as a script on its stdin (role "stdio",
`run_program`). The harness (rl/sandbox/harness.py) imports _Channel and _set_limits from here.
The design and threat model are in rl/sandbox/__init__.py.

Test: `pytest tests/rl/test_sandbox_attacks.py tests/rl/test_io_tests.py`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import struct
import sys
import types

_MAX_MESSAGE = 64 * 1024 * 1024  # largest message between harness and program
_TMPFS = "size=64m,nr_inodes=16384,mode=755"
_JAIL_DIRS = ("/usr", "/bin", "/lib", "/lib32", "/lib64", "/libx32")
_JAIL_FILES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom", "/etc/ld.so.cache")
_SECCOMP_ARCH = {  # audit arch, syscall numbers (fork and vfork exist on x86_64 only)
    "x86_64": (0xC000003E, {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435}),
    "aarch64": (0xC00000B7, {"clone": 220, "clone3": 435}),
}
_PLAIN = frozenset({type(None), bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset})


# --- both children: framing and limits ----------------------------------------------------------


class _ProtocolError(Exception):
    """A message that breaks the framing (too long)."""


class _Channel:
    """Length-prefixed pickles over a pair of pipes."""

    def __init__(self, read_fd: int, write_fd: int):
        self.read_fd, self.write_fd = read_fd, write_fd

    def send(self, message, persistent_id=None) -> None:
        self.write(self.frame(message, persistent_id))

    @staticmethod
    def frame(message, persistent_id=None) -> bytes:
        buf = io.BytesIO()
        pickler = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
        if persistent_id is not None:
            pickler.persistent_id = persistent_id
        pickler.dump(message)
        return struct.pack(">Q", buf.tell()) + buf.getvalue()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.write_fd, view):]

    def recv(self, unpickler=pickle.Unpickler, persistent_load=None):
        (size,) = struct.unpack(">Q", self._read(8))
        if size > _MAX_MESSAGE:
            raise _ProtocolError(f"message of {size} bytes")
        loader = unpickler(io.BytesIO(self._read(size)))
        if persistent_load is not None:
            loader.persistent_load = persistent_load
        return loader.load()

    def _read(self, n: int) -> bytes:
        parts, left = [], n
        while left:
            chunk = os.read(self.read_fd, min(left, 1 << 20))
            if not chunk:
                raise EOFError("the other side closed the pipe")
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)


def _set_limits(limits: dict, *, nproc: int | None) -> None:
    mem = limits["memory_mb"] * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if nproc is not None:  # counts every process of the uid, so only with a uid of our own
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


# --- the program process (untrusted once the program runs) ---------------------------------------


def _enter_jail(uid: int) -> None:
    """As root in fresh mount/pid/net namespaces: chroot into a tmpfs holding read-only binds of the
    system libraries and the Python install, with /tmp/work (owned by `uid`) as working directory."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    ms_rdonly, ms_nosuid, ms_nodev, ms_remount, ms_bind, ms_rec = 1, 2, 4, 32, 4096, 16384

    def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        enc = (lambda s: s.encode() if s is not None else None)
        if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
            raise OSError(ctypes.get_errno(), f"mount {source} on {target}: {os.strerror(ctypes.get_errno())}")

    def bind(path: str, target: str, extra: int) -> None:
        mount(path, target, None, ms_bind | ms_rec)
        mount(None, target, None, ms_bind | ms_remount | ms_rdonly | extra)

    root = "/tmp"  # any directory: the mount namespace is private (unshare's default propagation)
    mount("tmpfs", root, "tmpfs", ms_nosuid | ms_nodev, _TMPFS)
    prefix = os.path.realpath(sys.base_prefix)
    dirs = [d for d in _JAIL_DIRS if os.path.lexists(d)]
    if not any(prefix == os.path.realpath(d) or prefix.startswith(os.path.realpath(d) + "/") for d in dirs):
        dirs.append(sys.base_prefix)
    for d in dirs:
        if os.path.islink(d):  # merged /usr: /bin -> usr/bin
            os.symlink(os.readlink(d), root + d)
            continue
        os.makedirs(root + d, exist_ok=True)
        bind(os.path.realpath(d), root + d, ms_nosuid | ms_nodev)
    for f in _JAIL_FILES:
        if os.path.exists(f):
            os.makedirs(os.path.dirname(root + f), exist_ok=True)
            open(root + f, "wb").close()
            bind(f, root + f, ms_nosuid)
    os.makedirs(root + "/tmp/work")
    os.chmod(root + "/tmp", 0o1777)
    os.chown(root + "/tmp/work", uid, uid)
    os.chroot(root)
    os.chdir("/tmp/work")
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no privileges regained through exec


def _forbid_fork() -> None:
    """A seccomp filter: fork, vfork and clone without CLONE_THREAD fail with EAGAIN (threads still
    start; clone3, whose flags a filter cannot read, fails with ENOSYS and libc falls back to clone),
    so the program's tree is this one process and RLIMIT_AS bounds all of its memory."""
    import ctypes

    arch, nr = _SECCOMP_ARCH[os.uname().machine]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE/JSET|K, BPF_RET|K
    allow, errno = 0x7FFF0000, 0x00050000
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, errno | 38),  # another ABI (i386, x32): ENOSYS
            (ld, 0, 0, 0), (jge, 0, 1, 0x40000000), (ret, 0, 0, errno | 38)]
    for name in ("fork", "vfork"):
        if name in nr:
            prog += [(jeq, 0, 1, nr[name]), (ret, 0, 0, errno | 11)]  # EAGAIN, as at a process limit
    prog += [(jeq, 0, 1, nr["clone3"]), (ret, 0, 0, errno | 38),
             (jeq, 0, 3, nr["clone"]), (ld, 0, 0, 16), (jset, 1, 0, 0x00010000), (ret, 0, 0, errno | 11),  # CLONE_THREAD
             (ret, 0, 0, allow)]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(prog))(*(Filter(*f) for f in prog))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(Program(len(prog), filters)), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "cannot install the seccomp filter")  # PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP


def _confine(cfg: dict) -> str:
    """Everything between the bootstrap and the untrusted code: cgroups, jail, rlimits, uid, seccomp,
    and the program's stdout/stderr pipes as fds 1 and 2. Returns the working directory."""
    for cgroup in cfg["cgroups"]:  # first, so that everything the program starts is inside
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write("0")
    home = "/tmp/work"
    if cfg["jail"]:
        _enter_jail(cfg["uid"])
    else:
        home = os.getcwd()
    _set_limits(cfg["limits"], nproc=32 if cfg["uid"] is not None else None)
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    if cfg["no_fork"]:
        _forbid_fork()
    os.environ.update(HOME=home, TMPDIR=home)
    os.umask(0o077)
    *_, out_fd, err_fd = cfg["fds"]
    for fd, target in ((out_fd, 1), (err_fd, 2)):  # from here on, output is the program's
        os.dup2(fd, target)
        os.close(fd)
    return home


def _program_main(cfg: dict) -> None:
    source = sys.stdin.buffer.read()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)  # the program reads EOF, never the parent
    os.close(null)
    home = _confine(cfg)
    read_fd, write_fd, _, _ = cfg["fds"]
    channel = _Channel(read_fd, write_fd)
    with open("solution.py", "wb") as f:
        f.write(source)
    module = types.ModuleType("solution")
    module.__file__ = os.path.join(home, "solution.py")
    sys.modules["solution"] = module
    try:
        exec(compile(source, "solution.py", "exec"), module.__dict__)
    except BaseException as e:  # noqa: BLE001  (SystemExit too: the program did not load)
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        channel.send(("error", f"the program did not load: {type(e).__name__}: {e}"[:500]))
        os._exit(1)
    channel.send(("ready",))
    _serve(channel, module.__dict__)


def _stdio_main(cfg: dict) -> None:
    """`run_program`'s child: the source arrives length-prefixed on stdin; what follows on stdin is
    the program's input. The program runs as __main__; its exit status is the process's."""
    (size,) = struct.unpack(">Q", _read_exactly(0, 8))
    source = _read_exactly(0, size)
    _confine(cfg)
    with open("solution.py", "wb") as f:
        f.write(source)
    code = 0
    try:
        exec(compile(source, "solution.py", "exec"), {"__name__": "__main__", "__file__": os.path.abspath("solution.py")})
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001  (a runtime error: the traceback goes to the program's stderr)
        import traceback

        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: what was written is what counts
            pass
    os._exit(code & 0xFF)


def _read_exactly(fd: int, n: int) -> bytes:
    parts, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            os._exit(3)  # the parent went away
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _serve(channel: _Channel, namespace: dict) -> None:
    """Answer the harness: values of plain types go by value, anything else as a handle (its index)."""
    handles: list = []

    def persistent_id(obj):
        if type(obj) in _PLAIN:
            return None
        handles.append(obj)
        return len(handles) - 1

    ops = {"lookup": namespace.__getitem__, "call": lambda f, a, k: f(*a, **k), "getattr": getattr,
           "len": len, "iter": iter, "next": next, "getitem": lambda obj, key: obj[key]}
    while True:
        try:
            op, *params = channel.recv(persistent_load=handles.__getitem__)
        except EOFError:
            os._exit(0)
        try:
            reply = ("ok", ops[op](*params))
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            channel.send(reply, persistent_id)
        except BaseException as e:  # noqa: BLE001  (SystemExit from a call is the program's answer)
            if op == "next" and isinstance(e, StopIteration):  # the one place where it means "exhausted"
                channel.send(("stop",))
            else:
                channel.send(("raise", type(e).__name__, str(e)[:1000]))


if __name__ == "__main__":
    del sys.path[0]  # this directory, put there by host._child_bootstrap: the program gets the standard library only
    _config = json.loads(sys.argv[1])
    {"program": _program_main, "stdio": _stdio_main}[_config["role"]](_config)
