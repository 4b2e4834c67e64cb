"""Corpus preparation: tokenizer + Parquet shards, reuse on a second run, rebuild of bad shards."""

import json

import pyarrow.parquet as pq
import pytest

from data import DataConfig
from data.prepare import prepare_corpus, user_documents
from data.shards import sha256_file
from data.tasks import is_heldout
from data.tokenizer import load_tokenizer


def small_cfg(**kw):
    return DataConfig(math_docs=600, shard_docs=200, num_workers=2, vocab_size=320, **kw)


def test_prepare_then_reuse_then_rebuild(tmp_path):
    logs = []
    c = prepare_corpus(small_cfg(), tmp_path, log=logs.append)
    assert len(c.manifest["shards"]) == 3 and c.manifest["docs"] == 600
    for e in c.manifest["shards"]:
        p = c.shard_dir / e["file"]
        assert sha256_file(p) == e["sha256"] and pq.read_metadata(p).num_rows == e["docs"]
    tok = load_tokenizer(c.tokenizer_path)
    # shards hold exactly the tokenised documents
    first = pq.read_table(c.shard_dir / "shard_00000.parquet").column("tokens")[0].as_py()
    assert "<answer>" in tok.decode(first) and tok.encode(tok.decode(first)) == first
    logs.clear()
    prepare_corpus(small_cfg(), tmp_path, log=logs.append)
    assert any("reusing tokenizer" in l for l in logs) and any("reusing 3 tokenised shards" in l for l in logs)
    # a damaged shard and a half-written leftover: the damaged one is rebuilt, the leftover removed
    (c.shard_dir / "shard_00001.parquet").write_bytes(b"garbage")
    (c.shard_dir / "shard_00002.parquet.tmp").write_bytes(b"half")
    logs.clear()
    c2 = prepare_corpus(small_cfg(), tmp_path, log=logs.append)
    assert any("reusing 2 shards, tokenising 1" in l for l in logs)
    assert not list(c.shard_dir.glob("*.tmp"))
    assert c2.manifest == c.manifest


def test_corpus_never_contains_heldout_prompts(tmp_path):
    from data.prepare import math_documents

    docs = math_documents(small_cfg(heldout_percent=30))
    prompts = [d.split("User: ")[1].split("\n")[0] for d in docs]
    assert prompts and not any(is_heldout(p, 30) for p in prompts)
    share = sum("c0" in d or "c1" in d for d in docs) / len(docs)
    assert 0.2 < share < 0.4  # reasoning_fraction 0.3


def test_reasoning_share_per_family():
    """data.reasoning_by_family: word problems worked, bare sums answered directly, one corpus (the demo's)."""
    from data.prepare import math_documents

    docs = math_documents(small_cfg(families=["add", "word"], reasoning_by_family={"add": 0.0, "word": 1.0}))
    word = [d for d in docs if " has " in d.split("\n")[0]]
    add = [d for d in docs if d not in word]
    assert len(word) > 200 and len(add) > 200
    assert all(" c0" in d or " c1" in d for d in word)
    assert not any(" c0" in d or " c1" in d for d in add)
    # a family without its own share keeps reasoning_fraction
    mixed = math_documents(small_cfg(families=["add", "word"], reasoning_fraction=0.0, reasoning_by_family={"word": 1.0}))
    assert mixed == docs


def test_user_file_errors_name_file_and_row(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\xff\xfe")
    with pytest.raises(ValueError, match="bad.txt: not UTF-8"):
        user_documents([str(bad)], "text")
    j = tmp_path / "x.jsonl"
    j.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"body": "b"}) + "\n")
    with pytest.raises(ValueError, match="x.jsonl: row 1 has no 'text'"):
        user_documents([str(j)], "text")
    empty = tmp_path / "e.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="e.txt: the file is empty"):
        user_documents([str(empty)], "text")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        user_documents([str(tmp_path / "*.nothing")], "text")
