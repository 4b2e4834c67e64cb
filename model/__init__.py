"""DeepSeek-V3 model code for a single device: ModelArgs, MLA, Gate/MoE, MTP, Transformer,
generation with the MLA latent cache, and Hugging Face import/export. No Ray, no parallelism
(see model/parallel.py for expert parallelism and activation checkpointing).

Test: `pytest tests/model/`.
"""

from model.args import ModelArgs, load_model_args
from model.transformer import Transformer

__all__ = ["ModelArgs", "Transformer", "load_model_args"]
