"""Byte-level BPE tokenizer trained with the `tokenizers` library on our corpus.

Digits are split one per token (so arithmetic stays learnable); BOS, EOS, PAD and the R1-Zero
tokens <think>, </think>, <answer>, </answer> are single special tokens. The saved tokenizer.json
loads in transformers' PreTrainedTokenizerFast.

Test: `pytest tests/data/test_data_tokenizer.py`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from data.templates import ANSWER, ANSWER_END, THINK, THINK_END

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, THINK, THINK_END, ANSWER, ANSWER_END]


class Tokenizer:
    """A thin wrapper with the ids the pipeline needs."""

    def __init__(self, tok: HFTokenizer, path: Path | None = None):
        self.tok = tok
        self.path = path
        ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer {path} lacks the special tokens {missing}")
        self.pad_id, self.bos_id, self.eos_id = ids[PAD], ids[BOS], ids[EOS]
        self.think_end_id, self.answer_end_id = ids[THINK_END], ids[ANSWER_END]

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | Path) -> Tokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tok.save(str(tmp))
    tmp.replace(path)  # complete or absent
    return Tokenizer(tok, path)


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises plain Exceptions for malformed files
        raise ValueError(f"{path} is not a valid tokenizer.json ({e})") from None
    return Tokenizer(tok, path)
