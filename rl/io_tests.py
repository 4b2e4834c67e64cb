"""Standard-input/standard-output tests (competitive programming: Codeforces, APPS, LiveCodeBench).

A stdio task's `tests` column holds a JSON spec instead of Python asserts:

    {"verifier": "stdio", "cases": [{"input": "1 2\\n", "output": "3\\n"}, ...],
     "compare": "exact" | "whitespace" | "float", "tolerance": 1e-6, "timeout_s": 2, "memory_mb": 256}

`run_io_tests(program, spec)` runs the program once per case with the case's input on stdin, in
the sandbox's jail and limits (`rl.sandbox.run_program`: fresh process, per-case time and memory
limits), and compares its complete stdout with the expected output here, in the trusted caller:
the program only ever sees its input, never the expected output, so the verdict cannot be forged.
A case passes when the program exits with status 0 within the limits and its output matches:

* exact: the same text (line ends "\\r\\n" read as "\\n"; one trailing newline optional);
* whitespace: the same whitespace-separated tokens;
* float: the same number of tokens; tokens that are both numbers within `tolerance` (absolute or
  relative; NaN never matches), others identical.

A prefix of the expected output is not a match (open-r1's zip passed one), an empty expected output
needs an empty output (a spec whose every case expects nothing is refused: a silent program would
pass), and more than max(64 KiB, 2 x expected + 1 KiB) of output fails the case. The first failing
case ends the run.

Test: `pytest tests/rl/test_io_tests.py`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from rl.sandbox import run_program

COMPARE = ("exact", "whitespace", "float")


@dataclass
class IOResult:
    passed: bool
    status: str  # passed | failed (wrong output) | error | timeout | killed | output_limit (of the first failing case)
    cases_passed: int
    cases_total: int
    duration_s: float
    detail: str = ""  # one line: which case failed and why


def spec_problem(spec) -> str | None:
    """Why `spec` is not a usable stdio spec (None when it is)."""
    if not isinstance(spec, dict) or spec.get("verifier") != "stdio":
        return "it is not a JSON object with \"verifier\": \"stdio\""
    cases = spec.get("cases")
    if not isinstance(cases, list) or not cases:
        return "it has no \"cases\" (a non-empty list of {\"input\", \"output\"})"
    for i, c in enumerate(cases):
        if not isinstance(c, dict) or not isinstance(c.get("input"), str) or not isinstance(c.get("output"), str):
            return f"its case {i} is not {{\"input\": str, \"output\": str}}"
    if not any(c["output"].strip() for c in cases):
        return "every case expects an empty output, so a program that prints nothing passes"
    if spec.get("compare", "exact") not in COMPARE:
        return f"its \"compare\" is {spec.get('compare')!r}; use one of {', '.join(COMPARE)}"
    for key in ("tolerance", "timeout_s", "memory_mb"):
        v = spec.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            return f"its {key!r} is {v!r}, not a positive number"
    return None


def parse_spec(tests: str) -> dict | None:
    """The stdio spec in a `tests` string, or None when it holds something else (Python tests)."""
    if not tests.lstrip().startswith("{"):
        return None
    try:
        spec = json.loads(tests)
    except ValueError:
        return None
    return spec if isinstance(spec, dict) and spec.get("verifier") == "stdio" else None


def _number(token: str) -> float | None:
    try:
        return float(token)
    except ValueError:
        return None


def same_output(got: str, want: str, compare: str = "exact", tolerance: float = 1e-6) -> bool:
    """Whether `got` matches `want` under `compare` (see the module docstring)."""
    if compare == "exact":
        norm = (lambda s: s.replace("\r\n", "\n").removesuffix("\n"))
        return norm(got) == norm(want)
    g, w = got.split(), want.split()
    if compare == "whitespace":
        return g == w
    assert compare == "float", compare
    if len(g) != len(w):
        return False
    for a, b in zip(g, w):
        x, y = _number(a), _number(b)
        if x is not None and y is not None:
            if not math.isclose(x, y, rel_tol=tolerance, abs_tol=tolerance):  # NaN is close to nothing
                return False
        elif a != b:
            return False
    return True


def run_io_tests(program: str, spec: dict, *, timeout_s: float = 10, memory_mb: int = 1024, isolation: str = "full") -> IOResult:
    """Run `program` on each case of `spec`; the spec's own timeout_s / memory_mb (per case) win over
    the arguments. Raises ValueError on a malformed spec, IsolationError as `run_tests` does."""
    problem = spec_problem(spec)
    if problem:
        raise ValueError(f"stdio spec: {problem}")
    compare, tol = spec.get("compare", "exact"), float(spec.get("tolerance", 1e-6))
    timeout_s, memory_mb = float(spec.get("timeout_s", timeout_s)), int(spec.get("memory_mb", memory_mb))
    cases, total_s = spec["cases"], 0.0
    for i, case in enumerate(cases):
        want = case["output"]
        run = run_program(program, case["input"], timeout_s=timeout_s, memory_mb=memory_mb,
                          output_limit=max(1 << 16, 2 * len(want.encode()) + 1024), isolation=isolation)
        total_s += run.duration_s
        if run.status != "ok":
            return IOResult(False, run.status, i, len(cases), total_s, f"case {i}: {run.status}: {run.detail}"[:300])
        if not same_output(run.stdout, want, compare, tol):
            return IOResult(False, "failed", i, len(cases), total_s,
                            f"case {i}: wrong output ({compare}): got {run.stdout[:60]!r}, want {want[:60]!r}")
    return IOResult(True, "passed", len(cases), len(cases), total_s)
