"""Hugging Face interop: read and write `transformers` DeepseekV3 checkpoint directories.

- config.py  config.json <-> ModelArgs, HF tensor names <-> our state-dict keys
- load.py    `from_hf_pretrained(path)`: sharded/FP8/bf16 hub checkpoints, lazily, every key checked;
             one expert-parallel rank's experts only; `from_hf_pretrained_zero3`: partitioned as it loads
- save.py    `save_hf_pretrained(model, path, ...)` and `save_hf_state(args, state, path, ...)` (tensors read
             as written): sharded output, generation_config, MTP, FP8

Test: `pytest tests/model/test_model_hf.py tests/model/test_model_hf_hub.py`.
"""

from model.hf.config import from_hf_config, key_map, to_hf_config
from model.hf.load import checkpoint_files, dequantize_fp8, from_hf_pretrained, from_hf_pretrained_zero3, hf_model_args
from model.hf.save import save_hf_pretrained, save_hf_state

__all__ = ["checkpoint_files", "dequantize_fp8", "from_hf_config", "from_hf_pretrained", "from_hf_pretrained_zero3", "hf_model_args", "key_map", "save_hf_pretrained", "save_hf_state", "to_hf_config"]
