"""A second opinion on every full-reward code completion (issue #17).

A task's own tests can be weak: HumanEval/32, /38 and /50 take a helper from the program (`poly`,
`encode_cyclic`, `encode_shift`), so a program that redefines the helper and returns a constant or
the identity passes them. When a completion scores full reward on a code task whose row has a
reference solution (`answer`: a whole program, or HumanEval's body that follows the prompt), the
RewardEvaluator re-runs it in the sandbox against a second suite built from the task:

1. the reference's helpers (its top-level imports, functions, classes and constants other than
   the entry point) defined by the *tests*, so the tests' `poly` or `encode_cyclic` is the
   reference's and runs in the trusted harness, never the program's;
2. the task's tests, unchanged;
3. differential tests: the literal argument tuples the tests pass to the entry point, mutated
   with a seed taken from the task (same length and character classes, numbers of the same sign
   and magnitude), each compared with the reference solution's output computed in the harness
   (floats to 1e-6). Inputs on which the reference raises or runs over 0.5 s are skipped.

The suite is checked once per task against the reference itself (cached); a task whose reference
fails it gets no differential part, or no second opinion at all. A completion that fails the
second suite (for any reason: a wrong value, an exception, a timeout) is a disagreement: the
evaluator counts it and scores the code reward 0.

Test: `pytest tests/rl/test_second_opinion.py`.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import logging
import math
import random
import string
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

from rl.rewards.code import task_program
from rl.sandbox import run_tests

log = logging.getLogger(__name__)

_HELPER_NODES = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)

# runs in the harness; REFERENCE, ENTRY and INPUTS are filled in, `candidate` is the program's entry point
_DIFFERENTIAL = '''
def _sputnik_second_opinion(candidate):
    import copy, math, signal

    class Slow(Exception):
        pass

    def alarm(signum, frame):
        raise Slow()

    def same(got, want):
        if isinstance(got, float) or isinstance(want, float):
            return (type(got) in (int, float) and type(want) in (int, float)
                    and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6))
        if type(want) in (list, tuple) and type(got) is type(want):
            return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))
        return got == want

    namespace = {"__name__": "reference"}
    exec(REFERENCE, namespace)
    reference = namespace[ENTRY]
    previous = signal.signal(signal.SIGALRM, alarm)
    for args in INPUTS:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.5)
            try:
                want = reference(*copy.deepcopy(args))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except Exception:  # outside the reference's domain, or too slow: not a question to ask
            continue
        assert same(candidate(*copy.deepcopy(args)), want), args
    signal.signal(signal.SIGALRM, previous)


_sputnik_second_opinion(ENTRY_NAME)
'''


@dataclass
class Opinion:
    verdict: str  # "agree" | "disagree" | "none" (no reference, or its suite does not hold)
    detail: str = ""
    cached: bool = False  # the verdict of an identical program on the same suite, not run again


def reference_program(sample: Mapping) -> str | None:
    """The task's reference solution as a whole program, or None."""
    entry, answer, prompt = sample.get("entry_point") or "", sample.get("answer") or "", sample.get("prompt") or ""
    if not entry or not answer.strip():
        return None
    for program in (answer, prompt + answer):
        try:
            tree = ast.parse(program)
        except SyntaxError:
            continue
        if any(isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)) and s.name == entry for s in tree.body):
            return program
    return None


def definitions(reference: str, *, leave_out: str | None = None) -> str:
    """The reference's top-level imports, functions, classes and constants (not its other
    statements), less the function `leave_out`."""
    tree = ast.parse(reference)
    keep = [s for s in tree.body if isinstance(s, _HELPER_NODES) and not (isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)) and s.name == leave_out)]
    return "\n\n".join(ast.get_source_segment(reference, s) for s in keep)


def literal_calls(tests: str, entry: str) -> list[tuple]:
    """Argument tuples of the tests' calls of the entry point (or `candidate`) written as literals."""
    calls = []
    for node in ast.walk(ast.parse(tests)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (entry, "candidate") and not node.keywords:
            try:
                args = tuple(ast.literal_eval(a) for a in node.args)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                continue
            if args not in calls:
                calls.append(args)
    return calls


def mutate(value, rng: random.Random):
    """A nearby value of the same shape: ints and floats of the same sign and magnitude, strings
    and sequences of the same length (letters stay letters of the same case, digits digits)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        moved = value + rng.randint(-max(3, abs(value) // 2), max(3, abs(value) // 2))
        return max(moved, 1 if value > 0 else 0) if value >= 0 else min(moved, -1)
    if isinstance(value, float):
        if not math.isfinite(value):
            return value
        moved = abs(value * rng.uniform(0.5, 1.5) + rng.uniform(-1, 1))
        return round(moved if value >= 0 else -moved, 3)
    if isinstance(value, str):
        def char(c):
            for pool in (string.ascii_lowercase, string.ascii_uppercase, string.digits):
                if c in pool and rng.random() < 0.5:
                    return rng.choice(pool)
            return c
        return "".join(map(char, value))
    if isinstance(value, (list, tuple)):
        items = [mutate(v, rng) if rng.random() < 0.5 else v for v in value]
        if rng.random() < 0.3:
            rng.shuffle(items)
        return type(value)(items)
    if isinstance(value, dict):
        return {k: mutate(v, rng) for k, v in value.items()}
    return value


def differential_inputs(calls: list[tuple], seed: int, n: int) -> list[tuple]:
    """Up to n mutated argument tuples, none equal to a call of the tests, each a Python literal."""
    rng, out = random.Random(seed), []
    for i in range(4 * n):
        if not calls or len(out) == n:
            break
        args = tuple(mutate(a, rng) for a in calls[i % len(calls)])  # the arguments keep their order
        try:
            literal = ast.literal_eval(repr(args)) == args
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            literal = False
        if literal and args not in calls and args not in out:
            out.append(args)
    return out


def second_suite(sample: Mapping, *, n_inputs: int = 8, differential: bool = True) -> str | None:
    """The second suite's test source for a task (see the module docstring), or None without a reference."""
    reference = reference_program(sample)
    if reference is None:
        return None
    entry, tests = sample["entry_point"], sample.get("tests") or ""
    suite = f"{definitions(reference, leave_out=entry)}\n\n{tests}\n"
    if differential:
        seed = int.from_bytes(hashlib.sha256(f"{sample.get('id', '')}\n{tests}".encode()).digest()[:8], "big")
        inputs = differential_inputs(literal_calls(tests, entry), seed, n_inputs)
        if inputs:
            suite += (f"\nREFERENCE = {definitions(reference)!r}\nENTRY = {entry!r}\nINPUTS = {inputs!r}\n"
                      + _DIFFERENTIAL.replace("ENTRY_NAME", entry))
    return suite


class SecondOpinion:
    """Re-runs full-reward code completions against `second_suite`; thread-safe, caches the suite per task."""

    # verdicts of programs already checked, newest last: a GRPO group often holds the same program
    # several times (the think text differs, the program does not), and the suite is fixed per task
    CACHE_SIZE = 4096

    def __init__(self, *, timeout_s: float = 10, memory_mb: int = 1024, isolation: str = "full", n_inputs: int = 8):
        self.timeout_s, self.memory_mb, self.isolation, self.n_inputs = timeout_s, memory_mb, isolation, n_inputs
        self._suites: dict[str, str | None] = {}
        self._verdicts: OrderedDict[str, Opinion] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, completion: str, sample: Mapping) -> Opinion:
        suite = self._suite(sample)
        if suite is None:
            return Opinion("none")
        program = task_program(completion, prompt=sample.get("prompt"), entry_point=sample["entry_point"])
        key = hashlib.sha256("\0".join((suite, program, str(sample["entry_point"]))).encode()).hexdigest()
        with self._lock:
            if key in self._verdicts:
                self._verdicts.move_to_end(key)
                return dataclasses.replace(self._verdicts[key], cached=True)
        result = run_tests(program, suite, entry_point=sample["entry_point"], timeout_s=self.timeout_s,
                           memory_mb=self.memory_mb, isolation=self.isolation)
        opinion = Opinion("agree") if result.passed else Opinion("disagree", f"{result.status}: {result.detail}"[:300])
        if result.status != "timeout":  # a timeout may be the machine's load, not the program: not remembered
            with self._lock:
                self._verdicts[key] = opinion
                while len(self._verdicts) > self.CACHE_SIZE:
                    self._verdicts.popitem(last=False)
        return opinion

    def _suite(self, sample: Mapping) -> str | None:
        key = hashlib.sha256("\0".join(str(sample.get(k) or "") for k in ("prompt", "answer", "tests", "entry_point")).encode()).hexdigest()
        with self._lock:
            if key in self._suites:
                return self._suites[key]
        suite = None
        reference = reference_program(sample)
        if reference is not None:
            for differential in (True, False):  # the reference must pass its own suite
                candidate = second_suite(sample, n_inputs=self.n_inputs, differential=differential)
                result = run_tests(reference, candidate, entry_point=sample["entry_point"], timeout_s=self.timeout_s,
                                   memory_mb=self.memory_mb, isolation=self.isolation)
                if result.passed:
                    suite = candidate
                    break
                log.info("second opinion for task %s: the reference fails the %s suite (%s: %s)", sample.get("id"),
                         "differential" if differential else "helpers-only", result.status, result.detail)
        with self._lock:
            self._suites[key] = suite
        return suite
