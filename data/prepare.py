"""Build (or reuse) the tokenizer and the tokenised corpus for a DataConfig.

`prepare_corpus(cfg, cache_root)` gathers the documents (synthetic arithmetic and programming
problems with a reasoning mix, held-out prompts left out; optional stdlib Python source and user
files), trains the tokenizer on them, and writes Parquet shards, all under
`cache_root/data-<fingerprint>/`. The fingerprint covers every setting that changes the corpus, so
a second run with the same settings reuses the tokenizer and the shards, and says so.

Test: `pytest tests/data/test_data_shards.py`.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import random
import sys
import sysconfig
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from data.config import DataConfig
from data.shards import write_shards
from data.synthetic import problems
from data.tasks import is_heldout
from data.templates import render_completion, render_prompt
from data.tokenizer import load_tokenizer, train_tokenizer


@dataclasses.dataclass
class Corpus:
    root: Path
    tokenizer_path: Path
    shard_dir: Path
    manifest: dict


def math_documents(cfg: DataConfig) -> list[str]:
    """Rendered prompt + completion; held-out prompts never appear. Reasoning in a fraction of them."""
    rng = random.Random(f"reasoning-mix-{cfg.seed}")
    docs = []
    for p in problems(cfg.math_docs * 2, cfg.seed, families=tuple(cfg.families), digits=cfg.digits):
        if is_heldout(p.prompt, cfg.heldout_percent):
            continue
        share = cfg.reasoning_by_family.get(p.family, cfg.reasoning_fraction)
        reasoning = " " + p.reasoning if rng.random() < share else ""
        docs.append(render_prompt(p.prompt, cfg.template) + render_completion(reasoning, p.answer, cfg.template))
        if len(docs) == cfg.math_docs:
            break
    return docs


def code_documents(cfg: DataConfig) -> list[str]:
    """Synthetic programming tasks (prompt + program), the same share with worked reasoning."""
    from data.synthetic import code_problems

    rng = random.Random(f"code-reasoning-mix-{cfg.seed}")
    docs = []
    for p in code_problems(cfg.code_docs * 2, cfg.seed, digits=cfg.digits):
        if is_heldout(p.prompt, cfg.heldout_percent):
            continue
        reasoning = " " + p.reasoning if rng.random() < cfg.reasoning_by_family.get("code", cfg.reasoning_fraction) else ""
        docs.append(render_prompt(p.prompt, cfg.template) + render_completion(reasoning, p.program, cfg.template))
        if len(docs) == cfg.code_docs:
            break
    return docs


def stdlib_documents(n: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size < 200_000)[:n]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def user_documents(patterns: list[str], field: str) -> list[str]:
    docs = []
    for pattern in patterns:
        paths = sorted(glob.glob(pattern)) or ([pattern] if Path(pattern).exists() else [])
        if not paths:
            raise FileNotFoundError(f"data.user_files: {pattern!r} matches no file")
        for path in map(Path, paths):
            docs.extend(_read_user_file(path, field))
    return docs


def _read_user_file(path: Path, field: str) -> list[str]:
    if path.suffix == ".txt":
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
        if not text.strip():
            raise ValueError(f"{path}: the file is empty")
        return [text]
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(path.read_bytes().splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ValueError(f"{path}: row {i} is not UTF-8 JSON") from None
            if not isinstance(rec, dict) or field not in rec:
                raise ValueError(f"{path}: row {i} has no {field!r} field")
            out.append(str(rec[field]))
        if not out:
            raise ValueError(f"{path}: the file is empty")
        return out
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
        if field not in table.column_names:
            raise ValueError(f"{path}: no column {field!r} (columns: {', '.join(table.column_names)})")
        if table.num_rows == 0:
            raise ValueError(f"{path}: the file is empty")
        return [str(x) for x in table.column(field).to_pylist()]
    raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use .txt, .jsonl or .parquet)")


def corpus_fingerprint(cfg: DataConfig) -> str:
    spec = dataclasses.asdict(cfg)
    spec.pop("num_workers")
    spec.pop("seq_len")
    files = []
    for pattern in cfg.user_files:
        for p in sorted(glob.glob(pattern)):
            st = Path(p).stat()
            files.append((p, st.st_size, st.st_mtime_ns))
    spec["_user_files_stat"] = files
    spec["_python"] = sys.version_info[:2] if cfg.stdlib_files else None
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def prepare_corpus(cfg: DataConfig, cache_root: str | Path, *, log: Callable[[str], None] = print) -> Corpus:
    fp = corpus_fingerprint(cfg)
    root = Path(cache_root) / f"data-{fp}"
    root.mkdir(parents=True, exist_ok=True)
    docs: list[str] | None = None

    def documents() -> list[str]:
        nonlocal docs
        if docs is None:
            docs = math_documents(cfg) + code_documents(cfg) + stdlib_documents(cfg.stdlib_files) + user_documents(cfg.user_files, cfg.text_field)
            if not docs:
                raise ValueError("data: the corpus is empty (math_docs, code_docs, stdlib_files and user_files are all 0/empty)")
            random.Random(cfg.seed).shuffle(docs)
        return docs

    tok_path = root / "tokenizer.json"
    if tok_path.is_file():
        tok = load_tokenizer(tok_path)
        log(f"data: reusing tokenizer {tok_path} (vocab {tok.vocab_size})")
    else:
        log(f"data: training a {cfg.vocab_size}-token BPE tokenizer on {len(documents())} documents")
        tok = train_tokenizer(documents(), cfg.vocab_size, tok_path)
    manifest_ok = (root / "shards" / "manifest.json").is_file()
    n_docs = len(documents()) if not manifest_ok else json.loads((root / "shards" / "manifest.json").read_text())["docs"]
    n_shards = max(1, -(-n_docs // cfg.shard_docs))
    manifest = write_shards(
        n_shards,
        lambda i: documents()[i * cfg.shard_docs : (i + 1) * cfg.shard_docs],
        tok_path,
        root / "shards",
        fingerprint=fp,
        tokenizer_fingerprint=tok.fingerprint(),
        num_workers=cfg.num_workers,
        log=log,
    )
    return Corpus(root, tok_path, root / "shards", manifest)
