"""Supervised fine-tuning data: a table of prompts and completions, tokenised, packed into rows
with document boundaries, and a deterministic, resumable loader over them (issue 22).

A table is JSONL or Parquet with either `prompt` and `completion` columns or a chat `messages`
column (a list of {"role", "content"}; the last message is the assistant's completion, the ones
before it the prompt), an optional `split` ("train" or "heldout"; default: by prompt hash, as the
task tables) and an optional `id`. A row without what it needs is refused with its number.

Each example is the prompt as GRPO renders it (`Tokenizer.prompt_ids`: our template, or a Hugging
Face tokenizer's chat template) followed by the completion's ids and EOS, so a fine-tuned model
continues exactly the prompts GRPO and `sputnik eval` give it. The loss is on completion tokens
only: targets at prompt positions are IGNORE.

Packing: per epoch, examples are shuffled (seeded by (seed, epoch)) and laid into rows of
`seq_len` positions first-fit in that order; a row's examples never attend to one another
(`doc_mask`: causal within each example), and positions restart at 0 in each. An example longer
than a row is cut to `seq_len + 1` tokens (counted in `truncated`). Global batch b of an epoch is
rows [b*B, (b+1)*B); rank r of W takes its B/W rows, so the union over ranks is the global batch
whatever the world size. `state_dict()` holds (epoch, batch): a resumed loader continues exactly.

Test: `pytest tests/data/test_data_sft.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.loader import ResumableCursor
from data.tasks import read_records, split_of

IGNORE = -100  # target id that contributes no loss (Transformer.loss's ignore_index)


class SFTDataError(ValueError):
    """A malformed SFT table; the message names the file and the row."""


def read_sft_table(path: str | Path) -> list[dict]:
    """[{"id", "prompt", "completion", "split", "messages"?}] of a JSONL/Parquet table."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such SFT table")
    records = read_records(path, SFTDataError, kind="SFT table", empty="the table holds no rows")
    return [_row(r, path, i) for i, r in enumerate(records)]


def _row(rec, path: Path, i: int) -> dict:
    if not isinstance(rec, dict):
        raise SFTDataError(f"{path}: row {i} is not an object")
    if "messages" in rec and rec["messages"] is not None:
        msgs = rec["messages"]
        ok = isinstance(msgs, list) and len(msgs) >= 2 and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
        if not ok:
            raise SFTDataError(f"{path}: row {i}: 'messages' must be a list of at least two {{role, content}} strings")
        if msgs[-1]["role"] != "assistant" or msgs[-2]["role"] != "user":
            raise SFTDataError(f"{path}: row {i}: 'messages' must end with a user message and then the assistant's completion")
        prompt, completion = msgs[-2]["content"], msgs[-1]["content"]
        history = msgs[:-1]
    else:
        for key in ("prompt", "completion"):
            if not isinstance(rec.get(key), str) or (key == "prompt" and not rec[key].strip()):
                raise SFTDataError(f"{path}: row {i} needs a non-empty string '{key}' (or a chat 'messages' list)")
        prompt, completion, history = rec["prompt"], rec["completion"], None
    split = rec.get("split") or split_of(prompt)
    if split not in ("train", "heldout"):
        raise SFTDataError(f"{path}: row {i}: split {split!r} is neither 'train' nor 'heldout'")
    return {"id": str(rec.get("id", f"{path.stem}-{i}")), "prompt": prompt, "completion": completion, "split": split,
            "messages": history}


def encode_examples(rows: list[dict], tok, template: str) -> list[tuple[list[int], int]]:
    """(ids, prompt length) per row: the prompt as GRPO renders it, then completion ids and EOS.
    A multi-turn `messages` history needs the tokenizer's own chat template."""
    from data.templates import render_chat

    out = []
    for r in rows:
        if r.get("messages") and len(r["messages"]) > 1:
            if not getattr(tok, "chat_template", None):
                raise SFTDataError(f"row {r['id']}: a multi-turn conversation needs a tokenizer with a chat template "
                                   f"(this one renders single prompts with the '{template}' template)")
            special = {k: v for k, v in tok.special.items() if v is not None}
            prompt = tok.encode(render_chat(tok.chat_template, r["messages"], add_generation_prompt=True, **special))
        else:
            prompt = tok.prompt_ids(r["prompt"], template)
        out.append((prompt + tok.encode(r["completion"]) + [tok.eos_id], len(prompt)))
    return out


def save_examples(path: Path, examples: list[tuple[list[int], int]]) -> None:
    """The encoded examples as Parquet (ids, prompt_len): what every worker reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"ids": [e[0] for e in examples], "prompt_len": [e[1] for e in examples]}), path)


def load_examples(path: Path) -> list[tuple[list[int], int]]:
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    return list(zip(t.column("ids").to_pylist(), t.column("prompt_len").to_pylist()))


def pack_rows(examples: list[tuple[list[int], int]], order: list[int], seq_len: int) -> list[list[int]]:
    """Example indices per row, first-fit in `order`: each example takes len(ids) - 1 positions
    (capped at seq_len); a row holds at most seq_len positions."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = min(len(examples[i][0]) - 1, seq_len)
        for r, f in enumerate(free):
            if f >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(seq_len - n)
    return rows


def build_row(examples: list[tuple[list[int], int]], idx: list[int], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """tokens, targets (IGNORE at prompt and padding positions), positions and doc (the example's
    number in the row, -1 for padding), each [seq_len]."""
    tokens = torch.full((seq_len,), pad_id, dtype=torch.long)
    targets = torch.full((seq_len,), IGNORE, dtype=torch.long)
    positions = torch.zeros(seq_len, dtype=torch.long)
    doc = torch.full((seq_len,), -1, dtype=torch.long)
    at = 0
    for d, i in enumerate(idx):
        ids, plen = examples[i]
        ids = ids[: seq_len + 1]
        n = len(ids) - 1
        t = torch.tensor(ids)
        tokens[at : at + n] = t[:-1]
        tgt = t[1:].clone()
        tgt[: max(plen - 1, 0)] = IGNORE  # target j is token j + 1: prompt tokens 1..plen-1
        targets[at : at + n] = tgt
        positions[at : at + n] = torch.arange(n)
        doc[at : at + n] = d
        at += n
    return {"tokens": tokens, "targets": targets, "positions": positions, "doc": doc}


def doc_mask(doc_BT: torch.Tensor) -> torch.Tensor:
    """[B, T, T] boolean attention mask: causal within each example of a packed row, nothing across
    examples; a padding position attends to itself only (no row of the mask is empty)."""
    T = doc_BT.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_BT.device).tril()
    same = (doc_BT.unsqueeze(2) == doc_BT.unsqueeze(1)) & (doc_BT.unsqueeze(2) >= 0)
    return (same & causal) | torch.eye(T, dtype=torch.bool, device=doc_BT.device)


class SFTLoader(ResumableCursor):
    """Packed SFT batches: {"tokens", "targets", "positions", "doc"} [B/W, seq_len] (module docstring)."""

    def __init__(self, examples: list[tuple[list[int], int]], *, seq_len: int, batch_size: int, pad_id: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"global batch size {batch_size} is not divisible by the world size {world_size}")
        if not examples:
            raise ValueError("no SFT examples to train on")
        self.examples, self.seq_len, self.batch_size, self.pad_id = examples, seq_len, batch_size, pad_id
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.truncated = sum(len(ids) - 1 > seq_len for ids, _ in examples)
        self.epoch, self.batch, self._rows_epoch, self._rows = 0, 0, -1, []
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(examples)} examples pack into {len(self._layout(0))} rows of {seq_len} positions, "
                             f"fewer than one batch of {batch_size}")

    def _layout(self, epoch: int) -> list[list[int]]:
        if self._rows_epoch != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)).tolist()
            self._rows, self._rows_epoch = pack_rows(self.examples, order, self.seq_len), epoch
        return self._rows

    @property
    def batches_per_epoch(self) -> int:
        return len(self._layout(self.epoch)) // self.batch_size

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        rows = self._layout(self.epoch)
        per_rank = self.batch_size // self.world_size
        first = self.batch * self.batch_size + self.rank * per_rank
        built = [build_row(self.examples, rows[first + k], self.seq_len, self.pad_id) for k in range(per_rank)]
        self.batch += 1
        return {k: torch.stack([b[k] for b in built]) for k in built[0]}
