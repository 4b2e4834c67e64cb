"""Hugging Face interop: read and write `transformers` DeepseekV3 checkpoint directories.

- config.py  config.json <-> ModelArgs, HF tensor names <-> our state-dict keys
- load.py    `from_hf_pretrained(path)`: sharded/FP8/bf16 hub checkpoints, lazily, every key checked
- save.py    `save_hf_pretrained(model, path, ...)`: sharded output, generation_config, MTP, FP8

Test: `pytest tests/model/test_model_hf.py tests/model/test_model_hf_hub.py`.
"""

from model.hf.config import from_hf_config, key_map, to_hf_config
from model.hf.load import checkpoint_files, dequantize_fp8, from_hf_pretrained
from model.hf.save import save_hf_pretrained

__all__ = ["checkpoint_files", "dequantize_fp8", "from_hf_config", "from_hf_pretrained", "key_map", "save_hf_pretrained", "to_hf_config"]
