"""DataConfig: the `data:` section of a run config (corpus, tokenizer, packing, tasks), validated
on load by orchestrator.config like every section.

Test: `pytest tests/data/test_data_shards.py` (the corpus it describes) and
`tests/orchestrator/test_orch_config.py` (loading and validation).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from pydantic import ConfigDict, Field

Pos = Annotated[int, Field(ge=1)]
NonNeg = Annotated[int, Field(ge=0)]


@dataclasses.dataclass
class DataConfig:
    __pydantic_config__ = ConfigDict(extra="forbid", allow_inf_nan=False)

    # tokenizer (byte-level BPE trained on the corpus, digits split one per token)
    vocab_size: Annotated[int, Field(ge=300)] = 512  # must not exceed the model vocab
    template: Literal["r1", "plain"] = "r1"  # prompt template for tasks and synthetic documents
    # synthetic math corpus: rendered prompt + completion, a fraction with worked reasoning
    math_docs: NonNeg = 40000
    reasoning_fraction: Annotated[float, Field(ge=0, le=1)] = 0.3  # share of corpus solutions worked step by step inside <think>
    digits: Annotated[int, Field(ge=1, le=12)] = 3  # operand size (difficulty)
    families: list[Literal["add", "sub", "chain", "word"]] = dataclasses.field(default_factory=lambda: ["add"])  # arithmetic task families in the corpus and the generators
    # per-family share of worked solutions, overriding reasoning_fraction (families above, and "code"):
    # a skill learned on one family and rarely shown on another is what GRPO can carry over (configs/demo.yaml)
    reasoning_by_family: dict[Literal["add", "sub", "chain", "word", "code"], Annotated[float, Field(ge=0, le=1)]] = dataclasses.field(default_factory=dict)
    task_families: list[Literal["add", "sub", "chain", "word"]] = dataclasses.field(default_factory=list)  # families of the GRPO and held-out arithmetic tasks (empty: `families`)
    heldout_percent: Annotated[int, Field(ge=0, le=50)] = 10  # prompts hashed into the held-out split
    # other sources
    code_docs: NonNeg = 0  # synthetic programming-task documents (prompt + solution)
    stdlib_files: NonNeg = 0  # Python standard-library modules added as a code corpus
    user_files: list[str] = dataclasses.field(default_factory=list)  # .txt / .jsonl / .parquet paths or globs
    text_field: str = "text"  # column / key holding the text in user .jsonl and .parquet files
    # tokenised shards and packing
    shard_docs: Pos = 10000  # documents per Parquet shard
    num_workers: Pos = 1  # tokenisation processes (each already uses the tokenizers library's threads)
    seq_len: Pos = 128  # tokens per packed training sequence
    seed: NonNeg = 0  # seed of the synthetic corpus
