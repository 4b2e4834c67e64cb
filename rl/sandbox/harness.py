"""The harness process of the code sandbox (trusted: it runs the tests). Standard library only: the
host starts this file as __main__ by its bare name (host._child_bootstrap) under `python -I -S`.
A name the tests use but do not define is the program's: a proxy whose calls, attributes and
iteration go to the program process (rl/sandbox/program.py); replies are decoded into plain data
only, anything else stays there as an opaque handle. Asserts are rewritten so that each executed
one is counted, unittest tests count one check each, and the verdict goes with the run's token to a
pipe only this process holds. The design and threat model are in rl/sandbox/__init__.py.

Test: `pytest tests/rl/test_sandbox_attacks.py tests/rl/test_reward_gaming.py tests/rl/test_sandbox_humaneval.py`.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import pickle
import sys
import types

if __name__ == "__main__":  # started by its bare name from this directory (host._child_bootstrap), outside the rl package
    from program import _Channel, _set_limits
else:
    from rl.sandbox.program import _Channel, _set_limits


class _ChannelLost(BaseException):
    """The program process died or broke the protocol; a BaseException so tests' `except Exception`
    cannot swallow it (a bare `except:` can, hence the sticky `_Program.lost`)."""


class RemoteError(Exception):
    """An exception raised in the program that is not a built-in exception type."""


class _Plain(pickle.Unpickler):
    """Builds plain data only: no class outside this list can be loaded, so nothing from the program
    process runs code in the harness."""

    _ALLOWED = {("builtins", "complex"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


class _Program:
    """The harness's side of the pipe to the program process."""

    def __init__(self, channel: _Channel):
        self.channel, self.lost, self.busy = channel, "", False

    def hello(self) -> str | None:
        """None when the program loaded, else why not."""
        try:
            msg = self.channel.recv(_Plain, persistent_load=self._remote)
        except Exception:  # a dead program or a malformed message
            self.lost = "the program process ended while loading"
            return self.lost
        if msg == ("ready",):
            return None
        if isinstance(msg, tuple) and len(msg) == 2 and msg[0] == "error" and isinstance(msg[1], str):
            return msg[1][:500]
        return "the program process broke the protocol while loading"

    def request(self, op: str, *params):
        if self.lost:
            raise _ChannelLost(self.lost)
        if self.busy:  # only a forged reply could ask for this (a handle called while unpickling)
            self.lost = "the program process sent a malformed reply"
            raise _ChannelLost(self.lost)
        # arguments that cannot be sent (a lambda, ...) raise here, in the tests, before anything is written
        frame = self.channel.frame((op, *params), lambda obj: obj.handle if type(obj) is _Remote else None)
        self.busy = True
        try:
            self.channel.write(frame)
            reply = self.channel.recv(_Plain, persistent_load=self._remote)
        except Exception as e:  # a dead program or a malformed reply (any error the decoder raises)
            self.lost = f"the program process ended or broke the protocol during the tests ({type(e).__name__})"
            raise _ChannelLost(self.lost) from None
        finally:
            self.busy = False
        if type(reply) is tuple and len(reply) == 2 and reply[0] == "ok":
            return reply[1]
        if reply == ("stop",) and op == "next":  # a remote iterator is exhausted; nothing else may say so
            raise StopIteration
        if type(reply) is tuple and len(reply) == 3 and reply[0] == "raise" and type(reply[1]) is str and type(reply[2]) is str:
            raise _exception(reply[1], reply[2])
        self.lost = "the program process sent a malformed reply"
        raise _ChannelLost(self.lost)

    def _remote(self, handle) -> _Remote:
        if type(handle) is not int:
            raise pickle.UnpicklingError("bad handle")
        return _Remote(self, handle)


def _exception(name: str, message: str) -> Exception:
    """The tests see a built-in exception type by name (so `except ValueError` works), except the
    ones that iteration treats as control flow: StopIteration raised by the program inside
    `all(map(f, xs))` would end the loop early and pass it (issue #17)."""
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, (StopIteration, StopAsyncIteration)):
        try:
            return cls(message)
        except Exception:  # a built-in that needs other arguments (UnicodeDecodeError, ...)
            pass
    return RemoteError(f"{name}: {message}")


class _Remote:
    """An object living in the program process. Calls, attributes, len, iteration and indexing go
    there; comparisons, hashing and truth stay here (identity), so the program cannot answer `==`."""

    __slots__ = ("program", "handle")

    def __init__(self, program: _Program, handle: int):
        self.program, self.handle = program, handle

    def __call__(self, *args, **kwargs):
        return self.program.request("call", self, args, kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__"):  # protocol probes (__setstate__, __array__, ...) are not forwarded
            raise AttributeError(name)
        return self.program.request("getattr", self, name)

    def __len__(self):
        return self.program.request("len", self)

    def __iter__(self):
        return self.program.request("iter", self)

    def __next__(self):
        return self.program.request("next", self)

    def __getitem__(self, key):
        return self.program.request("getitem", self, key)

    def __repr__(self) -> str:
        return f"<object {self.handle} of the program>"


class _TestGlobals(dict):
    """The tests' globals: a name neither defined by the tests nor a built-in is the program's."""

    def __init__(self, program: _Program, asserts: _Asserts):
        super().__init__(__name__="__tests__", _sputnik_assert=asserts)
        self.program = program

    def __missing__(self, name: str):
        if name in builtins.__dict__:
            raise KeyError(name)
        try:
            value = self.program.request("lookup", name)
        except KeyError:
            raise KeyError(name) from None
        self[name] = value
        return value


class _Asserts:
    """Counts executed checks: asserts (the rewritten tests call `_sputnik_assert(ok, line)`) and
    unittest tests (through `_count_unittest`)."""

    def __init__(self):
        self.passed = self.failed = 0
        self.first_failure = ""

    def __call__(self, ok: bool, where: int | str) -> None:
        if ok is True:
            self.passed += 1
        else:
            self.failed += 1
            self.first_failure = self.first_failure or (f"tests.py line {where}" if isinstance(where, int) else where)


def _count_unittest(checks: _Asserts) -> None:
    """Count each unittest test that ran as a check (passed, or failed with its failures, errors
    and subtests), whatever runner or `exit=` the tests use: `unittest.main(exit=False)` passing a
    program that fails every test is how tests that run nothing looked like a pass (issue #17)."""
    import unittest

    result = unittest.TestResult
    outcomes = {"addSuccess": True, "addExpectedFailure": True, "addFailure": False, "addError": False, "addUnexpectedSuccess": False}
    for name, ok in outcomes.items():
        def hook(self, test, *args, _orig=getattr(result, name), _ok=ok):
            checks(_ok, f"unittest {test}")
            return _orig(self, test, *args)
        setattr(result, name, hook)

    def add_sub_test(self, test, subtest, err, _orig=result.addSubTest):
        if err is not None:  # a passing subtest's test reports its own success
            checks(False, f"unittest {subtest}")
        return _orig(self, test, subtest, err)
    result.addSubTest = add_sub_test


class _ModuleView:
    """The tests' globals seen as a module: unittest.main() looks for TestCases in `__main__`."""

    def __init__(self, namespace: dict):
        self.__dict__ = namespace


class _RewriteAsserts(ast.NodeTransformer):
    """`assert T` -> try: ok = bool(T) / except Exception: ok = False; _sputnik_assert(ok, line).

    A failing assert does not stop the tests, so the fraction passed is known."""

    def __init__(self):
        self.count = 0

    def visit_Assert(self, node: ast.Assert):
        self.count += 1
        store, load = ast.Name("_sputnik_ok", ast.Store()), ast.Name("_sputnik_ok", ast.Load())
        check = ast.Try(
            body=[ast.Assign([store], ast.Call(ast.Name("bool", ast.Load()), [node.test], []))],
            handlers=[ast.ExceptHandler(ast.Name("Exception", ast.Load()), None, [ast.Assign([store], ast.Constant(False))])],
            orelse=[], finalbody=[])
        record = ast.Expr(ast.Call(ast.Name("_sputnik_assert", ast.Load()), [load, ast.Constant(node.lineno)], []))
        return [ast.copy_location(check, node), ast.copy_location(record, node)]


def _compile_tests(source: str, entry_point: str | None) -> tuple[types.CodeType, int]:
    """The tests compiled with asserts rewritten, and how many asserts they contain."""
    tree = ast.parse(source, "tests.py")
    defines = any(isinstance(s, ast.FunctionDef) and s.name == "check" for s in tree.body)
    calls = any(isinstance(s, ast.Expr) and isinstance(s.value, ast.Call) and isinstance(s.value.func, ast.Name)
                and s.value.func.id == "check" for s in tree.body)
    if entry_point and defines and not calls:
        tree.body.append(ast.Expr(ast.Call(ast.Name("check", ast.Load()), [ast.Name(entry_point, ast.Load())], [])))
    rewriter = _RewriteAsserts()
    tree = ast.fix_missing_locations(rewriter.visit(tree))
    return compile(tree, "tests.py", "exec"), rewriter.count


def _harness(job: dict, program: _Program) -> dict:
    try:
        code, n_asserts = _compile_tests(job["tests"], job["entry_point"])
    except (SyntaxError, ValueError) as e:
        return {"status": "error", "detail": f"the tests do not compile: {e}"}
    problem = program.hello()
    if problem is not None:
        return {"status": "lost" if program.lost else "error", "detail": problem}
    asserts = _Asserts()
    if "unittest" in job["tests"]:
        _count_unittest(asserts)
    namespace = _TestGlobals(program, asserts)
    sys.modules["__main__"], sys.argv = _ModuleView(namespace), ["tests.py"]
    error = ""
    try:
        exec(code, namespace)
    except _ChannelLost:
        pass
    except SystemExit as e:  # only the tests' own code raises it here (unittest.main); the program's arrives as RemoteError
        if e.code not in (None, 0, False) and not asserts.failed:
            error = f"the tests exited with status {e.code!r}"
    except BaseException as e:  # noqa: BLE001  (an error in the tests or raised by the program)
        import traceback

        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == "tests.py"), 0)
        error = f"the tests raised {type(e).__name__}: {str(e)[:200]} (tests.py line {line})"
    total = max(asserts.passed + asserts.failed, n_asserts)
    counts = {"passed": asserts.passed, "total": total}
    if program.lost:
        return {"status": "lost", "detail": program.lost, **counts}
    if error:
        return {"status": "failed", "detail": error, **counts}
    if asserts.failed:
        return {"status": "failed", "detail": f"{asserts.failed} check(s) failed, first at {asserts.first_failure}", **counts}
    if not asserts.passed:  # no executed check, no pass (issue #17): empty or comment-only tests, check() never called
        why = "none of the tests' asserts ran (is check() called? pass entry_point)" if n_asserts else "the tests contain no check (no assert, no unittest test)"
        return {"status": "error", "detail": why, **counts}
    return {"status": "passed", "detail": "", **counts}


def _harness_main(cfg: dict) -> None:
    job = json.loads(sys.stdin.buffer.read())
    _set_limits(cfg["limits"], nproc=None)
    if cfg["protect"]:  # reduced isolation: a program of the same uid cannot read our memory or fds through /proc
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
    read_fd, write_fd, verdict_fd = cfg["fds"]
    report = _harness(job, _Program(_Channel(read_fd, write_fd)))
    report["token"] = job["token"]
    data = memoryview(json.dumps(report).encode())
    while data:
        data = data[os.write(verdict_fd, data):]
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: threads or atexit hooks the tests may have left


if __name__ == "__main__":
    del sys.path[0]  # this directory, put there by host._child_bootstrap: the tests get the standard library only
    _harness_main(json.loads(sys.argv[1]))
