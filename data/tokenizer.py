"""Tokenizers: our byte-level BPE, and any Hugging Face tokenizer directory, behind one interface.

Ours is trained with the `tokenizers` library on our corpus: digits split one per token (so
arithmetic stays learnable); BOS, EOS, PAD and the R1-Zero tokens <think>, </think>, <answer>,
</answer> are single special tokens. A Hugging Face tokenizer directory (tokenizer.json +
tokenizer_config.json, optionally generation_config.json, special_tokens_map.json and
chat_template.jinja, as released with DeepSeek-V3/R1, Moonlight and others) works the same way.

The interface (`Tokenizer`): `bos_id` (None if the tokenizer has none), `eos_id`, `pad_id` (the
EOS id where there is no PAD token), `stop_ids` (the ids that end a completion), `encode`/`decode`
(no special tokens added) and `prompt_ids(prompt, template)`, the ids a task prompt becomes:
- ours ("native": it holds all of SPECIAL_TOKENS): BOS + the config's template (data.templates),
  stopping at </answer> or EOS, exactly as before; an exported copy of it still counts as ours;
- any other: the tokenizer's chat template with the prompt as the one user message, when it has
  one, else the config's template (BOS added as its tokenizer_config asks); with the "r1" template
  the generation prompt is followed by "<think>" unless the chat template already ends with it (as
  DeepSeek-R1's does), so that completions have the R1-Zero form the rewards check. Stops: EOS,
  generation_config's eos_token_id(s), and </answer> where that is a single token.
`save_pretrained(dir)` writes what `transformers.AutoTokenizer.from_pretrained(dir)` loads.

Test: `pytest tests/data/test_data_tokenizer.py tests/model/test_model_hf_hub.py`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from data.templates import ANSWER, ANSWER_END, THINK, THINK_END, chat_template_for, render_chat, render_prompt

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, THINK, THINK_END, ANSWER, ANSWER_END]
# files of a Hugging Face tokenizer directory, copied along on export
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _token_str(v) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return v.get("content") if isinstance(v, dict) else v


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


class Tokenizer:
    """The ids and prompt rendering the pipeline needs, for our tokenizer or a Hugging Face one."""

    def __init__(self, tok: HFTokenizer, path: Path | None = None, *, config: dict | None = None,
                 generation: dict | None = None, chat_template: str | None = None):
        self.tok, self.path = tok, path
        self.config, self.generation = config or {}, generation or {}
        ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        self.native = all(i is not None for i in ids.values())
        self.think_end_id, self.answer_end_id = ids[THINK_END], ids[ANSWER_END]  # None where not single tokens
        if self.native:
            self.pad_id, self.bos_id, self.eos_id = ids[PAD], ids[BOS], ids[EOS]
            self.stop_ids = [self.answer_end_id, self.eos_id]
            self.chat_template = None  # ours always renders the config's template
            return
        cfg = {**_read_json(path.parent / "special_tokens_map.json"), **self.config} if path else self.config
        self.special = {k: _token_str(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        tid = lambda k: tok.token_to_id(self.special[k]) if self.special[k] is not None else None
        gen_eos = self.generation.get("eos_token_id")
        gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
        self.bos_id = tid("bos_token") if tid("bos_token") is not None else self.generation.get("bos_token_id")
        self.eos_id = tid("eos_token") if tid("eos_token") is not None else (gen_eos[0] if gen_eos else None)
        if self.eos_id is None:
            raise ValueError(f"tokenizer {path} has no end-of-sequence token: set eos_token in its tokenizer_config.json "
                             f"(or eos_token_id in generation_config.json)")
        pad = tid("pad_token") if tid("pad_token") is not None else self.generation.get("pad_token_id")
        self.pad_id = pad if pad is not None else self.eos_id
        stops = [self.eos_id, *gen_eos] + ([self.answer_end_id] if self.answer_end_id is not None else [])
        self.stop_ids = list(dict.fromkeys(stops))
        ct = chat_template if chat_template is not None else self.config.get("chat_template")
        if isinstance(ct, list):  # [{"name": "default", "template": ...}, ...]
            ct = next((c["template"] for c in ct if c.get("name") == "default"), ct[0]["template"] if ct else None)
        self.chat_template = ct or None

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

    def prompt_ids(self, prompt: str, template: str) -> list[int]:
        """The ids of a task prompt, ready for generation (see the module docstring)."""
        if self.native:
            return [self.bos_id] + self.encode(render_prompt(prompt, template))
        if self.chat_template:
            special = {k: v for k, v in self.special.items() if v is not None}
            text = render_chat(self.chat_template, [{"role": "user", "content": prompt}], add_generation_prompt=True, **special)
            if template == "r1" and not text.rstrip().endswith(THINK):
                text += THINK
            return self.encode(text)  # the template writes the special tokens itself, as transformers' apply_chat_template
        ids = self.tok.encode(render_prompt(prompt, template), add_special_tokens=True).ids
        if self.bos_id is not None and self.config.get("add_bos_token") and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def special_ids(self) -> dict:
        """bos/eos/pad_token_id for config.json, and the stop ids for generation_config.json."""
        stops = [self.eos_id] if self.native else [i for i in self.stop_ids if i != self.answer_end_id]
        return {"bos_token_id": self.bos_id, "eos_token_id": self.eos_id, "pad_token_id": self.pad_id, "stop_token_ids": stops}

    def save_pretrained(self, out: str | Path, *, template: str = "r1", model_max_length: int | None = None) -> None:
        """Write tokenizer files that transformers' AutoTokenizer loads: a Hugging Face tokenizer's
        own files are copied; ours gets a tokenizer_config.json (PreTrainedTokenizerFast, our special
        tokens, and `template` as its chat template)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        src = self.path.parent if self.path is not None else None
        if self.path is not None and self.path.resolve() != (out / "tokenizer.json").resolve():
            shutil.copyfile(self.path, out / "tokenizer.json")
        elif self.path is None:
            self.tok.save(str(out / "tokenizer.json"))
        if not self.native:
            for name in TOKENIZER_FILES[1:]:
                if src is not None and (src / name).is_file() and src.resolve() != out.resolve():
                    shutil.copyfile(src / name, out / name)
            if not (out / "tokenizer_config.json").is_file():
                (out / "tokenizer_config.json").write_text(json.dumps(self.config or {"tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
            return
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "chat_template": chat_template_for(template, bos_token=BOS),
        }
        if model_max_length:
            config["model_max_length"] = model_max_length
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


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
    """Our tokenizer.json, or a Hugging Face tokenizer: a directory (or its tokenizer.json) with
    tokenizer_config.json and optionally generation_config.json / chat_template.jinja beside it."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises plain Exceptions for malformed files
        raise ValueError(f"{path} is not a valid tokenizer.json ({e})") from None
    d = path.parent
    jinja = d / "chat_template.jinja"
    return Tokenizer(tok, path, config=_read_json(d / "tokenizer_config.json"), generation=_read_json(d / "generation_config.json"),
                     chat_template=jinja.read_text() if jinja.is_file() else None)
