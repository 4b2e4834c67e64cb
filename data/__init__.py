"""Data for Sputnik: tokenizer, prompt templates, synthetic arithmetic and programming corpus,
Parquet shards, the packing loader, and task tables (arithmetic, HumanEval, reasoning-gym,
jsonl/parquet files). Never imports Ray.

Test: `pytest tests/data/`.
"""

from data.config import DataConfig

__all__ = ["DataConfig"]
