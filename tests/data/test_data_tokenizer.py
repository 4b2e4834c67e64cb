"""Tokenizer: special tokens are single ids, digits split, round trip, transformers can load it."""

import pytest

from data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"User: What is {a} + {a * 7}?\nAssistant: <think> step </think> <answer>{a * 8}</answer>" for a in range(100, 400)]
    return train_tokenizer(texts, 320, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_special_tokens_and_digits(tok):
    for t in SPECIAL_TOKENS:
        assert len(tok.encode(t)) == 1
    ids = tok.encode("12345")
    assert [tok.decode([i]) for i in ids] == list("12345")
    text = "User: What is 12 + 7?\nAssistant: <think></think> <answer>19</answer>"
    assert tok.decode(tok.encode(text)) == text


def test_loads_in_transformers(tok):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok.path))
    s = "What is 3 + 4? <answer>7</answer>"
    assert fast(s, add_special_tokens=False)["input_ids"] == tok.encode(s)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "none.json")
    p = tmp_path / "tokenizer.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(p)
