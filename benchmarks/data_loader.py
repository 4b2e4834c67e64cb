"""Data pipeline throughput on CPU, in one run:
- packing loader (PackedLoader over Parquet shards) vs a plain Python list-of-lists packer;
- tokenisation of the same corpus with 1 vs 2 processes.

Run: `python benchmarks/data_loader.py [--docs 40000]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from data import DataConfig
from data.loader import PackedLoader
from data.prepare import math_documents
from data.shards import write_shards
from data.tokenizer import train_tokenizer


def python_packer(docs: list[list[int]], seq_len: int, batch: int, bos: int, eos: int, seed: int):
    """The baseline: shuffle a list of lists, concatenate into a Python list, slice windows."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    for i in order:
        stream += [bos] + docs[i] + [eos]
    w = seq_len + 1
    for b in range(len(stream) // (w * batch)):
        rows = [stream[(b * batch + r) * w : (b * batch + r + 1) * w] for r in range(batch)]
        yield [row[:-1] for row in rows], [row[1:] for row in rows]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=40000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    cfg = DataConfig(math_docs=a.docs)
    texts = math_documents(cfg)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        tok = train_tokenizer(texts[:5000], cfg.vocab_size, d / "tokenizer.json")
        per_shard = -(-len(texts) // 8)
        times = {}
        for workers in (1, 2):
            out = d / f"shards{workers}"
            t = time.perf_counter()
            manifest = write_shards(8, lambda i: texts[i * per_shard : (i + 1) * per_shard], tok.path, out,
                                    fingerprint=str(workers), tokenizer_fingerprint=tok.fingerprint(), num_workers=workers, log=lambda s: None)
            times[workers] = time.perf_counter() - t
        n_tokens = manifest["tokens"]
        loader = PackedLoader(d / "shards2", seq_len=a.seq, batch_size=a.batch, bos_id=tok.bos_id, eos_id=tok.eos_id)
        n = loader.batches_per_epoch
        t = time.perf_counter()
        for _ in range(n):
            next(loader)
        t_packed = time.perf_counter() - t
        docs = [r for f in sorted((d / "shards2").glob("*.parquet")) for r in pq.read_table(f).column("tokens").to_pylist()]
        t = time.perf_counter()
        m = sum(1 for _ in python_packer(docs, a.seq, a.batch, tok.bos_id, tok.eos_id, 0))
        t_plain = time.perf_counter() - t
    tok_per_batch = a.batch * a.seq
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {len(texts)} documents, {n_tokens} tokens")
    print(f"tokenise, 1 process : {n_tokens / times[1]:10.0f} tokens/s")
    print(f"tokenise, 2 processes: {n_tokens / times[2]:10.0f} tokens/s  (ratio {times[1] / times[2]:.2f}x)")
    print(f"packing loader      : {n * tok_per_batch / t_packed:10.0f} tokens/s ({n} batches of {a.batch} x {a.seq})")
    print(f"plain Python packer : {m * tok_per_batch / t_plain:10.0f} tokens/s ({m} batches)")
    print(f"ratio loader/plain  : {(n * tok_per_batch / t_packed) / (m * tok_per_batch / t_plain):.2f}x")


if __name__ == "__main__":
    main()
