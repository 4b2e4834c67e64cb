"""HumanEval through the sandbox (issue #6): every canonical solution passes and every solution whose
body is replaced by `return None` fails, with the tests exactly as data.tasks.load_humaneval() stores
them (`test` + `check(entry_point)`). Two runs at a time, as the reward evaluator does on 2 cores.
"""

import concurrent.futures as cf

import pytest

from data.tasks import load_humaneval
from rl.sandbox import run_tests

# a fast subset: helpers from the prompt (poly, encode_cyclic, encode_shift), 100 random calls (53),
# floats (4, 32), tuples (8), many asserts (141), empty inputs (151, 163)
SUBSET = ["HumanEval/0", "HumanEval/4", "HumanEval/8", "HumanEval/32", "HumanEval/38", "HumanEval/50",
          "HumanEval/53", "HumanEval/141", "HumanEval/151", "HumanEval/163"]


@pytest.fixture(scope="module")
def tasks():
    return load_humaneval().to_pylist()


def _score(rows, program_of):
    with cf.ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda r: run_tests(program_of(r), r["tests"], entry_point=r["entry_point"], timeout_s=30), rows))


def _canonical(row):
    return row["prompt"] + row["answer"]


def _return_none(row):
    return row["prompt"] + "    return None\n"


def _check(rows):
    good = _score(rows, _canonical)
    failing = [(r["id"], g.status, g.detail) for r, g in zip(rows, good) if not g.passed]
    assert not failing, failing
    assert all(g.tests_passed == g.tests_total > 0 for g in good)
    bad = _score(rows, _return_none)
    passing = [r["id"] for r, b in zip(rows, bad) if b.passed or b.status != "failed"]
    assert not passing, passing


def test_humaneval_subset(tasks):
    _check([t for t in tasks if t["id"] in SUBSET])


@pytest.mark.slow
def test_humaneval_all_164(tasks):
    assert len(tasks) == 164
    _check(tasks)
