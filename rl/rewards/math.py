"""Verifiable math reward: is the completion's final answer equal to the reference?

The answer is taken from the completion only: the last <answer>...</answer>, else the last
outermost \\boxed{...}; no answer scores 0. The answer must be a final value, not a restatement
(issue #17: math-verify evaluates "34 + 65", so copying the question scored 1):

* a numeric reference (integer, decimal, fraction, percentage) is matched only by a plain number
  — 99, 99.0, -7/8, \\frac{1}{2} (fractions in lowest terms), 0.\\overline{3}, 1.5 \\times 10^{3}, "x = 3", with units in
  \\text{} or a degree sign allowed — compared exactly as rationals, without any parser;
  an unevaluated expression such as "34 + 65" or "2^{10}" scores 0;
* any other reference (2\\sqrt{2}, (x+1)^2, intervals, equations) goes to math-verify, so
  equivalent forms pass (\\sqrt{8}, x^2+2x+1); but an answer with an operator that appears
  verbatim in the prompt scores 0 unless it is the reference itself.

math-verify runs in worker processes (rl/rewards/worker.py): its signal-based timeouts need a main
thread (Ray actors and thread pools call us from other threads), and a wall-clock limit enforced
from outside kills the worker when an input explodes (power towers, thousands of nested
parentheses) — that sample scores 0. math-verify accepts some wrong answers (it compares floats to
~6 digits and reduces equations to "lhs - rhs"), so a "yes" is re-checked: numbers at 60
significant digits with a relative tolerance of 1e-40, equations as proportional "lhs - rhs",
symbolic expressions by simplification.

Test: `pytest tests/rl/test_math_reward.py`.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
from fractions import Fraction

log = logging.getLogger(__name__)

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_FRACTION = re.compile(r"^([+-]?\d+)\s*/\s*(\d+)$")
_LATEX_FRAC = re.compile(r"^([+-]?)\\[dt]?frac(?:\{([+-]?\d+)\}\{(\d+)\}|(\d)(\d))$")
_REPEATING = re.compile(r"^([+-]?)(\d*)\.(\d*)\\(?:overline|bar)\{(\d+)\}$")
_SCIENTIFIC = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))(?:\s*(?:\\times|\\cdot|\*)\s*10\^\{?([+-]?\d+)\}?|[eE]([+-]?\d+))$")
_UNIT = re.compile(r"\s*(\\(?:text|mathrm|mbox)\{[^{}]*\}|\^\{?\\circ\}?|°)\s*$")
_VARIABLE = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*")
_OPERATOR = re.compile(r"[-+*/^=<>]|\\[a-zA-Z]")
MAX_ANSWER_CHARS = 1000


def extract_answer(completion: str) -> str | None:
    """The last <answer>...</answer> of the completion, else its last \\boxed{...}, else None."""
    found = _ANSWER.findall(completion)
    if found:
        return found[-1].strip()
    boxed = last_boxed(completion)
    return boxed.strip() if boxed is not None else None


def _boxes(text: str) -> list[tuple[int, int]]:
    """(start, end) of the content of each outermost \\boxed{...} that is closed, in order."""
    out, i = [], 0
    while (i := text.find("\\boxed{", i)) >= 0:
        depth, start = 0, i + len("\\boxed{")
        for j in range(start, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                if depth == 0:
                    out.append((start, j))
                    break
                depth -= 1
        else:
            return out
        i = j + 1
    return out


def last_boxed(text: str) -> str | None:
    """Content of the last outermost \\boxed{...}, nested braces (and boxes) included; None when
    absent or unclosed. \\boxed{\\frac{1}{\\boxed{2}}} is 1/2, not 2."""
    boxes = _boxes(text)
    return text[boxes[-1][0]:boxes[-1][1]] if boxes else None


def _unbox(s: str) -> str:
    """s with every \\boxed{X} replaced by X."""
    while boxes := _boxes(s):
        start, end = boxes[0]
        s = s[: start - len("\\boxed{")] + s[start:end] + s[end + 1:]
    return s


def _clean(s: str) -> str:
    s = _unbox(s.strip().strip("$").strip())
    for space in ("\\!", "\\,", "\\;", "\\:", "\\ ", "{,}", "\\left", "\\right"):
        s = s.replace(space, "")
    s = re.sub(r"(?<=\d),(?=\d{3}(\D|$))", "", s)  # 1,000 -> 1000
    return s.rstrip(".").strip()


def as_rational(s: str) -> Fraction | None:
    """Exact value of a plain number: 42, -3.50, 7/8, \\frac{7}{8}, 0.\\overline{3}; None otherwise."""
    s = _clean(s)
    if _NUMBER.match(s):
        return Fraction(s)
    m = _FRACTION.match(s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    m = _LATEX_FRAC.match(s)
    if m:
        num, den = (m.group(2), m.group(3)) if m.group(2) is not None else (m.group(4), m.group(5))
        if int(den) != 0:
            v = Fraction(int(num), int(den))
            return -v if m.group(1) == "-" else v
    m = _REPEATING.match(s)
    if m:  # 1.2\overline{34} = 1.2 + 0.0343434... = 1.2 + 34 / (99 * 10)
        sign, whole, fixed, rep = m.groups()
        v = Fraction(int(whole or "0")) + Fraction(int(fixed or "0"), 10 ** len(fixed)) + Fraction(int(rep), (10 ** len(rep) - 1) * 10 ** len(fixed))
        return -v if sign == "-" else v
    return None


def final_number(s: str) -> Fraction | None:
    """The value of an answer written as a final number (see the module docstring), else None.
    A fraction must be in lowest terms: 2048/2 is a division left undone."""
    s = _clean(s)
    s = re.sub(r"^\\?\$", "", s).strip()  # a currency sign
    while (stripped := _UNIT.sub("", s)) != s:
        s = stripped.strip()
    s = _VARIABLE.sub("", s, count=1)
    m = _SCIENTIFIC.match(s)
    if m:
        exp = int(m.group(2) or m.group(3))
        return Fraction(m.group(1)) * Fraction(10) ** exp if abs(exp) <= 400 else None
    fraction = _FRACTION.match(s) or _LATEX_FRAC.match(s)
    if fraction:
        num, den = [int(g) for g in fraction.groups() if g is not None and g.lstrip("+-").isdigit()][:2]
        if den == 1 or math.gcd(num, den) != 1:
            return None
    return as_rational(s)


def _squash(s: str) -> str:
    s = _clean(s)
    for a, b in (("\\times", "*"), ("\\cdot", "*"), ("×", "*"), ("\\div", "/"), ("÷", "/"), ("**", "^")):
        s = s.replace(a, b)
    return re.sub(r"\s+", "", s)


def restates(pred: str, prompt: str, answer: str) -> bool:
    """True when `pred` has an operator and appears verbatim in the prompt (and is not the reference)."""
    p = _squash(pred)
    return bool(_OPERATOR.search(p[1:])) and p in _squash(prompt) and p != _squash(answer)


def _percent_variants(s: str, mode: str) -> list[str]:
    """'50%' -> ['50'] (mode 'strip'), ['0.5'] ('fraction') or both ('either')."""
    t = _clean(s)
    if not t.endswith("%") and not t.endswith("\\%"):
        return [t]
    body = t[:-2] if t.endswith("\\%") else t[:-1]
    out = []
    if mode in ("strip", "either"):
        out.append(body)
    if mode in ("fraction", "either"):
        v = as_rational(body)
        out.append(str(v / 100) if v is not None else f"({body})/100")
    return out


# --- the worker process -----------------------------------------------------------------------


def _strict_equal(gold, pred) -> bool:
    """Re-check a math-verify 'yes' where it is known to be lenient."""
    import sympy

    if isinstance(gold, sympy.core.relational.Relational) or isinstance(pred, sympy.core.relational.Relational):
        if not (isinstance(gold, sympy.Eq) and isinstance(pred, sympy.Eq)):
            return False
        a, b = gold.lhs - gold.rhs, pred.lhs - pred.rhs
        if b == 0:
            return a == 0
        ratio = sympy.simplify(a / b)
        return bool(ratio.free_symbols == set() and ratio != 0 and ratio.is_finite)
    if not isinstance(gold, sympy.Expr) or not isinstance(pred, sympy.Expr):
        return True  # sets, intervals, matrices: math-verify's structural comparison stands
    if not gold.free_symbols and not pred.free_symbols:
        g, p = sympy.N(gold, 60), sympy.N(pred, 60)
        scale = max(abs(g), abs(p))
        return bool(abs(g - p) <= sympy.Float(1e-40, 60) * scale) if scale != 0 else True
    return sympy.simplify(gold - pred) == 0


def _verify(gold: str, pred: str) -> bool:
    from math_verify import parse, verify

    g, p = parse(f"${gold}$"), parse(f"${pred}$")
    if not g or not p:
        return False
    if not verify(g, p):
        return False
    return _strict_equal(g[0], p[0])


def _verify_request(request: tuple[str, str], state: dict) -> bool:
    """The worker's handler (rl/rewards/worker.py): any parser or sympy failure means "not shown equal"."""
    try:
        return bool(_verify(*request))
    except Exception:
        return False


def _warm() -> None:
    """Imported once when a worker starts, so that a call's time limit covers only the verification."""
    import math_verify  # noqa: F401
    import sympy  # noqa: F401


class MathVerifier:
    """math-verify in `processes` worker processes with a wall-clock limit; thread-safe."""

    def __init__(self, timeout_s: float = 5.0, processes: int = 2):
        from rl.rewards.worker import WorkerPool

        self.timeout_s = timeout_s
        self._pool = WorkerPool(__file__, "_verify_request", processes=processes, warm="_warm", quiet=True)
        self._count_lock = threading.Lock()
        self.timeouts = 0

    def equal(self, gold: str, pred: str, *, timeout_s: float | None = None) -> bool:
        from rl.rewards.worker import WorkerFailed

        try:
            return bool(self._pool.call((gold, pred), timeout_s or self.timeout_s))
        except WorkerFailed as e:
            with self._count_lock:
                self.timeouts += 1
                n = self.timeouts
            if n <= 5 or n % 100 == 0:  # bounded logging
                log.warning("math reward: verification failed (%s; %d so far); input starts %r", e, n, pred[:60])
            return False

    def close(self) -> None:
        self._pool.close()


@functools.lru_cache(maxsize=1)
def default_verifier() -> MathVerifier:
    """One verifier per process; its workers start on first use."""
    return MathVerifier()


def math_reward(completion: str, answer: str, *, percent: str = "strip", prompt: str | None = None,
                verifier: MathVerifier | None = None) -> float:
    """1.0 when the completion's final answer equals `answer`, else 0.0 (see the module docstring);
    with `prompt`, an answer that restates it scores 0."""
    pred = extract_answer(completion)
    if pred is None or not pred or len(pred) > MAX_ANSWER_CHARS:
        return 0.0
    golds, preds = _percent_variants(answer, percent), _percent_variants(pred, percent)
    for g in golds:
        gv = as_rational(g)
        for p in preds:
            if gv is not None:  # a numeric reference wants a number, not an expression that evaluates to one
                if final_number(p) == gv:
                    return 1.0
                continue
            if prompt and restates(p, prompt, g):
                continue
            if (verifier or default_verifier()).equal(g, p):
                return 1.0
    return 0.0
