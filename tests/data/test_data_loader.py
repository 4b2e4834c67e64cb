"""Packing loader: exact resume, rank sharding equals the global batch, packing preserves documents."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.loader import PackedLoader
from data.shards import ShardError, SCHEMA

BOS, EOS = 1, 2


@pytest.fixture
def shard_dir(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(10, 100, size=rng.integers(3, 40)).tolist() for _ in range(300)]
    entries = []
    for i in range(3):
        part = docs[i * 100 : (i + 1) * 100]
        name = f"shard_{i:05d}.parquet"
        pq.write_table(pa.table({"tokens": pa.array(part, type=pa.list_(pa.int32()))}, schema=SCHEMA), tmp_path / name)
        entries.append({"file": name, "docs": len(part), "tokens": sum(map(len, part)), "sha256": ""})
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": entries}))
    return tmp_path, docs


def loader(d, **kw):
    return PackedLoader(d, seq_len=16, batch_size=4, bos_id=BOS, eos_id=EOS, seed=3, **kw)


def test_resume_gives_the_batches_of_an_uninterrupted_run(shard_dir):
    d, _ = shard_dir
    a = loader(d)
    straight = [next(a) for _ in range(a.batches_per_epoch + 20)]  # crosses an epoch boundary
    assert a.epoch >= 1
    b = loader(d)
    stop = a.batches_per_epoch - 5
    for _ in range(stop):
        next(b)
    state = json.loads(json.dumps(b.state_dict()))
    c = loader(d)
    c.load_state_dict(state)
    resumed = [next(c) for _ in range(25)]
    for x, y in zip(straight[stop:], resumed, strict=True):
        assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["positions"], y["positions"])


def test_ranks_split_the_global_batch(shard_dir):
    d, _ = shard_dir
    whole = next(loader(d))
    parts = [next(loader(d, rank=r, world_size=2)) for r in range(2)]
    assert torch.equal(torch.cat([p["tokens"] for p in parts]), whole["tokens"])
    assert torch.equal(torch.cat([p["targets"] for p in parts]), whole["targets"])
    with pytest.raises(ValueError, match="not divisible"):
        loader(d, rank=0, world_size=3)


def test_packing_lays_documents_end_to_end(shard_dir):
    d, docs = shard_dir
    L = loader(d)
    L._layout(0)
    stream = np.concatenate([[BOS] + docs[i] + [EOS] for i in L._perm])
    b = next(L)
    assert torch.equal(b["tokens"][0], torch.from_numpy(stream[:16]))
    assert torch.equal(b["targets"][0], torch.from_numpy(stream[1:17]))
    assert torch.equal(b["tokens"][1], torch.from_numpy(stream[17:33]))
    # positions restart at each BOS
    toks, pos = b["tokens"].flatten(), b["positions"].flatten()
    assert torch.all(pos[toks == BOS] == 0)
    # a different epoch shuffles differently, with the same documents
    L._layout(1)
    assert not np.array_equal(L._perm, np.arange(300)) and sorted(L._perm) == list(range(300))


def test_corrupted_and_missing_inputs_name_the_file(shard_dir):
    d, _ = shard_dir
    (d / "shard_00001.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(ShardError, match="shard_00001.parquet"):
        loader(d)
    pq.write_table(pa.table({"ids": pa.array([[1, 2]], type=pa.list_(pa.int32()))}), d / "shard_00001.parquet")
    with pytest.raises(ShardError, match="shard_00001.parquet: missing column 'tokens'"):
        loader(d)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        loader(d / "nowhere")
