"""Packing loader: tokenised shards -> fixed-length [B, T] batches, deterministic and resumable.

Documents (BOS + tokens + EOS) are shuffled per epoch with a generator seeded by (seed, epoch),
laid end to end, and cut into windows of T + 1 tokens (inputs and next-token targets). Global
batch b of an epoch is windows [b*B, (b+1)*B); rank r of W takes rows [r*B/W, (r+1)*B/W), so the
union over ranks is the same global batch whatever the world size. `positions` restart at 0 at
every document start (document boundaries for models that use them).

`state_dict()` / `load_state_dict()` hold (epoch, batch): the batch after a resume is the batch the
uninterrupted run would have produced.

Test: `pytest tests/data/test_data_loader.py`; benchmark: `python benchmarks/data_loader.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from data.shards import ShardError, read_shard_tokens


class ResumableCursor:
    """(epoch, batch) of a seeded, deterministic loader: what a checkpoint keeps so that the batch
    after a resume is the one the uninterrupted run would have produced (PackedLoader, data.sft.SFTLoader)."""

    epoch: int
    batch: int
    seed: int

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader has seed {self.seed}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


class PackedLoader(ResumableCursor):
    def __init__(self, shard_dir: str | Path, *, seq_len: int, batch_size: int, bos_id: int, eos_id: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"global batch size {batch_size} is not divisible by the world size {world_size}")
        shard_dir = Path(shard_dir)
        manifest_path = shard_dir / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} does not exist: prepare the corpus first")
        manifest = json.loads(manifest_path.read_text())
        values, lengths = [], []
        for entry in manifest["shards"]:
            vals, offsets = read_shard_tokens(shard_dir / entry["file"])
            if len(offsets) - 1 != entry["docs"]:
                raise ShardError(f"{shard_dir / entry['file']}: {len(offsets) - 1} documents, manifest says {entry['docs']}")
            off = offsets.to_numpy()
            values.append(vals.to_numpy(zero_copy_only=False)[off[0] : off[-1]])
            lengths.append(np.diff(off))
        if not values:
            raise ShardError(f"{shard_dir}: the manifest lists no shards")
        self.tokens = np.concatenate(values).astype(np.int64)
        doc_len = np.concatenate(lengths)
        if len(doc_len) == 0:
            raise ShardError(f"{shard_dir}: the shards hold no documents")
        self.doc_start = np.concatenate([[0], np.cumsum(doc_len)[:-1]])
        self.doc_len = doc_len + 2  # with BOS and EOS
        self.bos_id, self.eos_id = bos_id, eos_id
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.window = seq_len + 1
        self.batches_per_epoch = int(self.doc_len.sum()) // self.window // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{shard_dir}: {int(self.doc_len.sum())} tokens are fewer than one batch of {batch_size} x {self.window}")
        self.epoch, self.batch = 0, 0
        self._perm_epoch = -1

    # --- deterministic layout of an epoch -------------------------------------------------------

    def _layout(self, epoch: int) -> None:
        if self._perm_epoch == epoch:
            return
        rng = np.random.default_rng([self.seed, epoch])
        self._perm = rng.permutation(len(self.doc_len))
        self._cum = np.cumsum(self.doc_len[self._perm])  # end of each permuted document in the stream
        self._perm_epoch = epoch

    def _span(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and in-document positions of stream positions [start, start + length)."""
        pos = np.arange(start, start + length)
        k = np.searchsorted(self._cum, pos, side="right")  # index of the permuted document
        doc = self._perm[k]
        offset = pos - (self._cum[k] - self.doc_len[doc])  # 0 = BOS, len+1 = EOS
        body = self.doc_start[doc] + np.clip(offset - 1, 0, None)
        toks = np.where(offset == 0, self.bos_id, np.where(offset == self.doc_len[doc] - 1, self.eos_id, self.tokens[np.minimum(body, len(self.tokens) - 1)]))
        return toks, offset

    # --- iteration ---------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        self._layout(self.epoch)
        per_rank = self.batch_size // self.world_size
        first = self.batch * self.batch_size + self.rank * per_rank
        toks, pos = self._span(first * self.window, per_rank * self.window)  # all rows in one pass
        toks = torch.from_numpy(toks.reshape(per_rank, self.window))
        pos = torch.from_numpy(pos.reshape(per_rank, self.window))
        self.batch += 1
        return {"tokens": toks[:, :-1].contiguous(), "targets": toks[:, 1:].contiguous(), "positions": pos[:, :-1].contiguous()}

    @property
    def total_tokens(self) -> int:
        return int(self.doc_len.sum())

