"""Verifiable math reward: is the completion's final answer equal to the reference?

The answer is taken from the completion only: the last <answer>...</answer>, else the last
\\boxed{...}; no answer scores 0. Plain numbers (integers, decimals, fractions a/b, percentages)
are compared exactly as rationals, without any parser. Everything else goes to math-verify, run in
a separate worker process: its signal-based timeouts need a main thread (Ray actors and thread
pools call us from other threads), and a wall-clock limit enforced from outside kills the worker
when an input explodes (power towers, thousands of nested parentheses) — that sample scores 0.

math-verify accepts some wrong answers (it compares floats to ~6 digits and reduces equations to
"lhs - rhs"), so a "yes" is re-checked: numbers at 60 significant digits with a relative tolerance
of 1e-40, equations as proportional "lhs - rhs", symbolic expressions by simplification.

Test: `pytest tests/rl/test_math_reward.py`.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import queue
import re
import threading
from fractions import Fraction

log = logging.getLogger(__name__)

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_FRACTION = re.compile(r"^([+-]?\d+)\s*/\s*(\d+)$")
_LATEX_FRAC = re.compile(r"^([+-]?)\\[dt]?frac\{(\d+)\}\{(\d+)\}$")
MAX_ANSWER_CHARS = 1000


def extract_answer(completion: str) -> str | None:
    """The last <answer>...</answer> of the completion, else its last \\boxed{...}, else None."""
    found = _ANSWER.findall(completion)
    if found:
        return found[-1].strip()
    boxed = last_boxed(completion)
    return boxed.strip() if boxed is not None else None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, nested braces included; None when absent or unclosed."""
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    depth, start = 0, i + len("\\boxed{")
    for j in range(start, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            if depth == 0:
                return text[start:j]
            depth -= 1
    return None


def _clean(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\boxed\{(.*)\}$", r"\1", s)
    s = s.replace("\\!", "").replace("\\,", "").replace("{,}", "")
    s = re.sub(r"(?<=\d),(?=\d{3}(\D|$))", "", s)  # 1,000 -> 1000
    return s.rstrip(".").strip()


def as_rational(s: str) -> Fraction | None:
    """Exact value of a plain number: 42, -3.50, 7/8, \\frac{7}{8}; None otherwise."""
    s = _clean(s)
    if _NUMBER.match(s):
        return Fraction(s)
    m = _FRACTION.match(s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    m = _LATEX_FRAC.match(s)
    if m and int(m.group(3)) != 0:
        v = Fraction(int(m.group(2)), int(m.group(3)))
        return -v if m.group(1) == "-" else v
    return None


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


def _serve(conn) -> None:
    while True:
        try:
            gold, pred = conn.recv()
        except EOFError:
            return
        try:
            ok = bool(_verify(gold, pred))
        except Exception:  # any parser/sympy failure: the answer is not shown equal
            ok = False
        conn.send(ok)


class _Worker:
    """One verification process, restarted after a timeout or a crash."""

    def __init__(self):
        self.proc = self.conn = None

    def call(self, gold: str, pred: str, timeout_s: float) -> bool | None:
        """The verdict, or None on timeout / crash (the process is then killed)."""
        if self.proc is None or not self.proc.is_alive():
            ctx = mp.get_context("spawn")
            self.conn, child = ctx.Pipe()
            self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
            self.proc.start()
        try:
            self.conn.send((gold, pred))
            # the first call also pays for the worker's imports
            if self.conn.poll(timeout_s):
                return self.conn.recv()
        except (EOFError, OSError):  # the worker died (e.g. out of memory)
            pass
        self.kill()
        return None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(timeout=2)
        self.proc = self.conn = None


class MathVerifier:
    """math-verify in `processes` worker processes with a wall-clock limit; thread-safe."""

    def __init__(self, timeout_s: float = 5.0, processes: int = 2):
        self.timeout_s = timeout_s
        self._free: queue.Queue[_Worker] = queue.Queue()
        for _ in range(processes):
            self._free.put(_Worker())
        self._workers = list(self._free.queue)
        self._count_lock = threading.Lock()
        self.timeouts = 0

    def equal(self, gold: str, pred: str, *, timeout_s: float | None = None) -> bool:
        worker = self._free.get()
        try:
            verdict = worker.call(gold, pred, timeout_s or self.timeout_s)
        finally:
            self._free.put(worker)
        if verdict is None:
            with self._count_lock:
                self.timeouts += 1
                n = self.timeouts
            if n <= 5 or n % 100 == 0:  # bounded logging
                log.warning("math reward: verification timed out or crashed (%d so far); input starts %r", n, pred[:60])
            return False
        return verdict

    def close(self) -> None:
        for w in self._workers:
            w.kill()


@functools.lru_cache(maxsize=1)
def default_verifier() -> MathVerifier:
    """One verifier per process; its worker starts on first use."""
    return MathVerifier()


def math_reward(completion: str, answer: str, *, percent: str = "strip", verifier: MathVerifier | None = None) -> float:
    """1.0 when the completion's final answer equals `answer`, else 0.0."""
    pred = extract_answer(completion)
    if pred is None or not pred or len(pred) > MAX_ANSWER_CHARS:
        return 0.0
    golds, preds = _percent_variants(answer, percent), _percent_variants(pred, percent)
    for g in golds:
        for p in preds:
            gv, pv = as_rational(g), as_rational(p)
            if gv is not None and pv is not None:
                if gv == pv:
                    return 1.0
                continue
            if (verifier or default_verifier()).equal(g, p):
                return 1.0
    return 0.0
