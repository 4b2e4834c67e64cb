"""Tokenised corpus shards: Parquet files of token-id lists (one row per document) plus a manifest.

`write_shards(n_shards, texts_of_shard, tokenizer_path, out_dir, *, fingerprint,
tokenizer_fingerprint)` tokenises the documents of each shard (in a process pool when
num_workers > 1) and writes `shard_00000.parquet`, ... Each shard is written to a temporary name
and renamed when complete, so an interrupted run leaves no half-written shard under a real name;
a re-run reuses every shard whose checksum matches the manifest and rebuilds the rest.
`manifest.json` holds per-shard document and token counts, SHA-256 checksums, the tokenizer
fingerprint and a fingerprint of the sources.

Test: `pytest tests/data/test_data_shards.py`.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([("tokens", pa.list_(pa.int32()))])


class ShardError(ValueError):
    """A shard or manifest that cannot be used; the message names the file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _single_threaded() -> None:
    # with several processes, one tokenizer thread each avoids oversubscribing the cores
    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _tokenize_shard(job: tuple[int, list[str], str, str]) -> dict:
    index, texts, tokenizer_path, out_dir = job
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    ids = tok.encode_batch(texts)
    table = pa.table({"tokens": pa.array(ids, type=pa.list_(pa.int32()))}, schema=SCHEMA)
    path = Path(out_dir) / f"shard_{index:05d}.parquet"
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return {"file": path.name, "docs": len(ids), "tokens": int(sum(len(x) for x in ids)), "sha256": sha256_file(path)}


def read_manifest(out_dir: Path) -> dict | None:
    path = out_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # an unreadable manifest is rebuilt, never trusted


def write_shards(
    n_shards: int,
    texts_of_shard: Callable[[int], list[str]],
    tokenizer_path: Path,
    out_dir: Path,
    *,
    fingerprint: str,
    tokenizer_fingerprint: str,
    num_workers: int = 2,
    log: Callable[[str], None] = print,
) -> dict:
    """Tokenise shard i = texts_of_shard(i) for i < n_shards, reusing complete shards."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.tmp"):
        stale.unlink()  # left by an interrupted run: never read
    old = read_manifest(out_dir) or {}
    reusable = {}
    if old.get("fingerprint") == fingerprint and old.get("tokenizer") == tokenizer_fingerprint:
        for entry in old.get("shards", []):
            p = out_dir / entry["file"]
            if p.is_file() and sha256_file(p) == entry["sha256"]:
                reusable[entry["file"]] = entry
    entries: dict[int, dict] = {}
    todo = []
    for i in range(n_shards):
        name = f"shard_{i:05d}.parquet"
        if name in reusable:
            entries[i] = reusable[name]
        else:
            todo.append(i)
    if not todo:
        log(f"data: reusing {n_shards} tokenised shards in {out_dir}")
    else:
        if entries:
            log(f"data: reusing {len(entries)} shards, tokenising {len(todo)} in {out_dir}")
        else:
            log(f"data: tokenising {len(todo)} shards into {out_dir} with {num_workers} processes")
        jobs = ((i, texts_of_shard(i), str(tokenizer_path), str(out_dir)) for i in todo)
        if num_workers > 1 and len(todo) > 1:
            with mp.get_context("spawn").Pool(num_workers, initializer=_single_threaded) as pool:
                for i, entry in zip(todo, pool.imap(_tokenize_shard, jobs)):
                    entries[i] = entry
        else:
            for i, job in zip(todo, jobs):
                entries[i] = _tokenize_shard(job)
    manifest = {
        "fingerprint": fingerprint,
        "tokenizer": tokenizer_fingerprint,
        "shards": [entries[i] for i in range(n_shards)],
        "docs": sum(e["docs"] for e in entries.values()),
        "tokens": sum(e["tokens"] for e in entries.values()),
    }
    tmp = out_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out_dir / "manifest.json")
    return manifest


def read_shard_tokens(path: Path) -> tuple[pa.Array, pa.Array]:
    """(flat int32 token values, int offsets) of one shard, memory-mapped."""
    try:
        table = pq.read_table(path, memory_map=True)
    except (pa.ArrowInvalid, OSError) as e:
        raise ShardError(f"{path}: not a readable Parquet shard ({e})") from None
    if "tokens" not in table.column_names:
        raise ShardError(f"{path}: missing column 'tokens' (has {table.column_names})")
    col = table.column("tokens").combine_chunks()
    if not pa.types.is_list(col.type) or not pa.types.is_integer(col.type.value_type):
        raise ShardError(f"{path}: column 'tokens' must be a list of integers, not {col.type}")
    return col.values, col.offsets
