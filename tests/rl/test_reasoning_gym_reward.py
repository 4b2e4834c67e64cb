"""reasoning-gym tasks (issue #25): generated, scored correct with their reference answers and wrong
with perturbed ones by reasoning-gym's own scorer through `math_accuracy`; gaming (an echo of the
question, several answers, a list of candidates) scores 0; a scorer that raises scores 0; the
rows survive a Parquet round trip. Also pass@k against hand-computed cases."""

import json
import math

import pyarrow.parquet as pq
import pytest

from data.tasks import generate_reasoning_gym, read_tasks
from rl.grpo import pass_at_k
from rl.rewards.builtin import math_accuracy

# list_functions builds a different entry on each call (global random state): its rows carry the metadata
GENERATORS = ["countdown", "basic_arithmetic", "chain_sum", "gcd", "word_sorting", "spell_backward", "list_functions"]


def perturb(answer: str) -> str:
    """A wrong answer close to the right one."""
    try:
        return str(int(answer) + 1)
    except ValueError:
        return answer + " + 1" if any(c.isdigit() for c in answer) else answer[::-1] + "x"


@pytest.mark.parametrize("name", GENERATORS)
def test_round_trip_reference_right_perturbed_wrong(name):
    rows = generate_reasoning_gym(name, 6, seed=5).to_pylist()
    for row in rows:
        assert math_accuracy(f"<think>ok</think> <answer>{row['answer']}</answer>", row) == 1.0, row["id"]
        assert math_accuracy(f"<answer>{perturb(row['answer'])}</answer>", row) == 0.0, (row["id"], row["answer"])
        assert math_accuracy("no answer at all", row) == 0.0


def test_countdown_accepts_another_correct_expression():
    """reasoning-gym's scorer, not string equality, decides: the reference in parentheses is another
    string with the same value and numbers; using a number twice is wrong."""
    for row in generate_reasoning_gym("countdown", 3, seed=1).to_pylist():
        assert math_accuracy(f"<answer>({row['answer']})</answer>", row) == 1.0
        first = row["answer"].replace("(", " ").split()[0].strip("*+-/")
        assert math_accuracy(f"<answer>{row['answer']} + {first} - {first}</answer>", row) == 0.0


def test_gaming_does_not_score():
    arith = generate_reasoning_gym("basic_arithmetic", 4, seed=2).to_pylist()
    count = generate_reasoning_gym("countdown", 4, seed=2).to_pylist()
    for row in arith + count:
        a = row["answer"]
        assert math_accuracy(row["prompt"], row) == 0.0  # echoing the question
        assert math_accuracy(f"<answer>{row['prompt']}</answer>", row) == 0.0
        assert math_accuracy(f"<answer>{row['prompt']} {a}</answer>", row) == 0.0
        assert math_accuracy(f"<answer>{perturb(a)}</answer> <answer>{a}</answer>", row) == 0.0  # several answers
        assert math_accuracy(f"<answer>{a}</answer> or \\boxed{{{perturb(a)}}}", row) == 1.0  # one answer block decides
    for row in arith:  # a list of candidates containing the reference: partial credit in reasoning-gym, 0 here
        cands = " ".join(str(int(row["answer"]) + d) for d in range(-3, 4))
        assert math_accuracy(f"<answer>{cands}</answer>", row) == 0.0


def test_a_raising_or_mismatched_scorer_scores_zero():
    row = generate_reasoning_gym("countdown", 1, seed=3).to_pylist()[0]
    good = f"<answer>{row['answer']}</answer>"
    spec = json.loads(row["tests"])
    assert "metadata" not in spec and math_accuracy(good, row) == 1.0  # its metadata holds tuples: the entry is rebuilt
    for broken in ({**spec, "dataset": "no_such_generator"}, {**spec, "config": {**spec["config"], "min_numbers": "x"}},
                   {**spec, "index": 1}, {**spec, "metadata": {}}):
        # unknown generator; raising config; an entry that is not this question; a scorer that raises (KeyError)
        assert math_accuracy(good, {**row, "tests": json.dumps(broken)}) == 0.0


def test_generators_without_a_reference_answer():
    """graph_color's entries have no single answer: the row's answer is "" and the scorer checks a
    proposed colouring; "None" (what str(None) would have stored) is not one."""
    rows = generate_reasoning_gym("graph_color", 2, seed=1).to_pylist()
    assert all(r["answer"] == "" for r in rows)  # and accepted by the schema check (test_rows_survive_a_parquet_file)
    assert all(math_accuracy("<answer>None</answer>", r) == 0.0 for r in rows)


def test_rows_survive_a_parquet_file(tmp_path):
    t = generate_reasoning_gym("chain_sum", 5, seed=9, min_terms=3, max_terms=3)
    pq.write_table(t, tmp_path / "rg.parquet")
    rows = read_tasks(tmp_path / "rg.parquet").to_pylist()
    assert rows == t.to_pylist()
    pq.write_table(generate_reasoning_gym("graph_color", 2, seed=1), tmp_path / "gc.parquet")
    assert read_tasks(tmp_path / "gc.parquet").num_rows == 2  # no reference answer, and that is allowed
    assert all(len(r["prompt"].split("+")) + len(r["prompt"].split("-")) - 1 >= 3 for r in rows)  # the option reached the generator
    assert all(math_accuracy(f"<answer>{r['answer']}</answer>", r) == 1.0 for r in rows)


@pytest.mark.parametrize("n, c, k, want", [
    (1, 0, 1, 0.0), (1, 1, 1, 1.0),
    (2, 1, 1, 0.5), (2, 1, 2, 1.0),
    (5, 2, 1, 0.4), (5, 2, 2, 1 - 3 / 10), (5, 2, 3, 1 - 1 / 10), (5, 2, 4, 1.0),
    (10, 3, 5, 1 - 21 / 252), (10, 0, 10, 0.0), (10, 10, 1, 1.0),
    (200, 20, 10, 1 - math.prod((180 - i) / (200 - i) for i in range(10))),
])
def test_pass_at_k_hand_computed(n, c, k, want):
    """1 - C(n-c, k) / C(n, k): e.g. n=5, c=2, k=2: C(3,2)/C(5,2) = 3/10 of the pairs are all wrong."""
    assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_pass_at_k_refuses_k_above_n():
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)
