"""Synthetic arithmetic and programming problems with worked, step-by-step reasoning.

An arithmetic problem (families add, sub, chain, word) has a prompt, an answer and a worked
solution (column addition / subtraction digit by digit with carries or borrows, running sums for
chains); a programming problem ("write f(x) returning x plus a plus b") has a program, its tests
and the worked sum of its constant. data.prepare renders a fraction `reasoning_fraction` of them
into the pretraining corpus with the worked solution in the think block and the rest with an empty
one (a direct answer): a tiny model answers far better when it reasons, so GRPO can learn to choose
reasoning (BENCHMARKS.md, "Demo"). data.tasks draws the task tables from the same generators.

Test: `pytest tests/data/test_data_tasks.py` (worked solutions end in the answer; programs pass
their tests).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana"]
ITEMS = ["apples", "coins", "books", "stamps", "marbles", "shells"]


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    reasoning: str
    family: str


def _column_add(a: int, b: int) -> str:
    """'3+6+0=9 c0, 2+5+0=7 c0, ...': digits from the right, with the carry in and out."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s % 10} c{s // 10}")
        carry = s // 10
    if carry:
        steps.append(f"carry {carry}")
    return ", ".join(steps) + f". So {a}+{b}={a + b}."


def _column_sub(a: int, b: int) -> str:
    """a >= b: '3-6-0=7 b1, ...' digits from the right with the borrow in and out."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, borrow = [], 0
    for i in range(len(da)):
        x, y = int(da[i]), int(db[i]) if i < len(db) else 0
        d = x - y - borrow
        nb = 1 if d < 0 else 0
        steps.append(f"{x}-{y}-{borrow}={d + 10 * nb} b{nb}")
        borrow = nb
    return ", ".join(steps) + f". So {a}-{b}={a - b}."


def make_problem(rng: random.Random, family: str, digits: int) -> Problem:
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    if family == "add":
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        return Problem(f"What is {a} + {b}?", str(a + b), _column_add(a, b), family)
    if family == "sub":
        a, b = sorted((rng.randint(lo, hi), rng.randint(lo, hi)), reverse=True)
        return Problem(f"What is {a} - {b}?", str(a - b), _column_sub(a, b), family)
    if family == "chain":
        xs = [rng.randint(lo, hi) for _ in range(rng.randint(3, 4))]
        steps, total = [], xs[0]
        for x in xs[1:]:
            steps.append(_column_add(total, x))
            total += x
        return Problem(f"What is {' + '.join(map(str, xs))}?", str(total), " Then ".join(steps), family)
    if family == "word":
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        prompt = f"{name} has {a} {item} and finds {b} more. How many {item} does {name} have now?"
        return Problem(prompt, str(a + b), f"{a} plus {b}: " + _column_add(a, b), family)
    raise ValueError(f"unknown arithmetic family {family!r} (known: add, sub, chain, word)")


@dataclass(frozen=True)
class CodeProblem:
    """A programming task: write `f(x)` returning x plus the sum of two numbers.

    The constant has to be computed (the prompt gives two addends), so a worked column addition in
    the think block helps exactly as it does for arithmetic; the program is checked by tests."""

    prompt: str
    program: str
    reasoning: str
    tests: str
    entry_point: str


def make_code_problem(rng: random.Random, digits: int) -> CodeProblem:
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    name = "f"  # one name: the tiny demo model should spend its capacity on the constant
    prompt = f"Write a Python function {name}(x) that returns x plus {a} plus {b}."
    program = f"def {name}(x):\n    return x + {a + b}"
    probes = sorted({0, 1, rng.randint(2, 999), -rng.randint(1, 999)})
    tests = "".join(f"assert {name}({x}) == {x + a + b}\n" for x in probes)
    return CodeProblem(prompt, program, _column_add(a, b), tests, name)


def code_problems(n: int, seed: int, *, digits: int = 2):
    """n programming problems, deterministic for (seed, digits)."""
    rng = random.Random(f"code-{seed}-{digits}")
    for _ in range(n):
        yield make_code_problem(rng, digits)


def problems(n: int, seed: int, *, families=("add",), digits: int = 3):
    """n problems, deterministic for (seed, families, digits)."""
    rng = random.Random(f"arith-{seed}-{digits}-{','.join(families)}")
    for _ in range(n):
        yield make_problem(rng, rng.choice(list(families)), digits)
