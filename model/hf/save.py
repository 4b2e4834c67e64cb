"""Export our Transformer as a Hugging Face DeepseekV3 checkpoint directory.

What `transformers.AutoModelForCausalLM.from_pretrained` loads without a warning, and what
engines reading DeepSeek-V3's layout serve:
- config.json (with bos/eos/pad_token_id when given) and generation_config.json;
- the main model's tensors in `model.safetensors`, or in shards `model-0000i-of-0000n.safetensors`
  listed by `model.safetensors.index.json` when they exceed `max_shard_size` (default 5 GB, as
  transformers does);
- the MTP modules (`mtp=`): "separate" (default) puts them, as DeepSeek names them (layer
  n_layers + k), in `mtp.safetensors` (sharded the same way) beside the model files: transformers
  has no MTP module and reports MTP tensors in its files as unexpected (it ignores only the 671B
  model's layer 61), while `model.hf.from_hf_pretrained` reads them back. "inline" puts them in the
  main files as DeepSeek's hub checkpoints do (for engines that run MTP speculative decoding);
  "none" leaves them out and declares `num_nextn_predict_layers: 0`;
- `fp8=True`: the linear weights in e4m3 with a float32 `weight_scale_inv` per 128x128 block and
  config `quantization_config`, DeepSeek-V3's layout (scale = block amax / 448).
Tokenizer files are the tokenizer's business (`data.tokenizer.Tokenizer.save_pretrained`).

Memory: tensors are made shard by shard. `save_hf_state` takes a function for the model's
tensors that can also give one expert of a layer's stacked experts, so an export from a checkpoint
on disk (orchestrator/export.py) holds one shard and one tensor at a time, not the model.

Test: `pytest tests/model/test_model_hf.py tests/model/test_model_hf_hub.py`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Literal

import torch
from safetensors.torch import save_file

from model.hf.config import SCALE_SUFFIX, is_fp8_linear, key_map, mtp_prefixes, to_hf_config
from model.hf.load import MTP_STEM
from model.args import ModelArgs
from model.transformer import Transformer

FP8_BLOCK = 128
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}


class ShapeMismatch(ValueError):
    """A tensor given to `save_hf_state` whose shape is not the one the model config gives."""


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "2GiB" (transformers' units)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not a size (e.g. 5GB, 500MB, or a number of bytes)")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


def _write_set(path: Path, stem: str, names: list[str], tensor, nbytes, max_bytes: int) -> None:
    """Tensors `names` as `<stem>.safetensors`, or shards + `<stem>.safetensors.index.json`.
    `tensor(name)` makes one tensor when its shard is written; `nbytes(name)` is its size."""
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:  # greedy, in model order, as transformers shards
        if shards[-1] and size + nbytes(n) > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes(n)
    if not names:
        return
    files = ([f"{stem}.safetensors"] if len(shards) == 1
             else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fname, keys in zip(files, shards):
        save_file({k: tensor(k) for k in keys}, str(path / fname), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(nbytes(n) for n in names)},
                 "weight_map": {k: fname for fname, keys in zip(files, shards) for k in keys}}
        (path / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_hf_pretrained(model: Transformer, path: str | Path, **options) -> None:
    """Write `model` to the HF directory `path` (see the module docstring; `options` as save_hf_state's)."""
    save_hf_state(model.args, dict_state(model.state_dict()), path, **options)


def dict_state(sd: dict[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`save_hf_state`'s tensor function for a state dict held in memory."""
    return lambda name, rows=None: sd[name] if rows is None else sd[name][rows]


def save_hf_state(args: ModelArgs, state: Callable[..., torch.Tensor], path: str | Path, *,
                  special_ids: dict[str, int | list[int] | None] | None = None,
                  mtp: Literal["separate", "inline", "none"] = "separate", fp8: bool = False,
                  dtype: torch.dtype = torch.float32, max_shard_size: int | str = "5GB") -> None:
    """Write the model of shape `args` whose state-dict tensor `name` is `state(name)` to the HF
    directory `path`; `state(name, rows)` gives only rows `rows` (a slice of the first dimension),
    which is how one expert of a layer's stacked experts (one HF tensor) is asked for. Tensors are
    asked for as their shard is written, each once, so a `state` that reads from disk keeps the
    peak at one shard and one tensor, not the model. A tensor whose shape is
    not the one `args` gives raises ShapeMismatch naming it.
    `special_ids`: {"bos_token_id", "eos_token_id", "pad_token_id"} for config.json, plus an optional
    "stop_token_ids" list, generation_config.json's eos_token_id (default: the eos id)."""
    if mtp not in ("separate", "inline", "none"):
        raise ValueError(f"mtp={mtp!r}: use 'separate', 'inline' or 'none'")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for old in [*path.glob("*.safetensors"), *path.glob("*.safetensors.index.json")]:
        old.unlink()  # a previous export's shards would not match the new index
    ids = dict(special_ids or {})
    stops = ids.pop("stop_token_ids", None)
    with torch.device("meta"):  # names and shapes, no memory
        shaped = Transformer(args)
    names = key_map(shaped)
    meta = shaped.state_dict()
    if args.tie_embeddings:
        names.pop("lm_head.weight")
    prefixes = mtp_prefixes(args)
    in_mtp = (lambda k: k.startswith(prefixes)) if prefixes else (lambda k: False)

    def ours(name: str, expert: int | None) -> torch.Tensor:
        if expert is not None:  # one expert of a layer's stacked experts: one HF tensor
            return one_expert(name, expert)
        t = state(name)
        if tuple(t.shape) != tuple(meta[name].shape):
            raise ShapeMismatch(f"{name!r} has shape {tuple(t.shape)}, the model config gives {tuple(meta[name].shape)}")
        return t

    def one_expert(name: str, e: int) -> torch.Tensor:
        n, *inner = meta[name].shape
        t = state(name, slice(e, e + 1 if e < n - 1 else None))  # the last one with any after it: their count is checked
        if t.shape[0] != 1:
            raise ShapeMismatch(f"{name!r} has {e + t.shape[0]} experts, the model config gives {n}")
        if list(t.shape[1:]) != inner:
            raise ShapeMismatch(f"{name!r} has experts of shape {tuple(t.shape[1:])}, the model config gives {tuple(inner)}")
        return t[0]

    def split(hf: str, get) -> torch.Tensor:
        name, transpose = names[hf]
        name, _, expert = name.partition("#")
        t = get(name, int(expert) if expert else None)
        return t.t() if transpose else t

    def weight(hf: str) -> torch.Tensor:
        return split(hf, ours).detach().cpu()

    def tensor(k: str) -> torch.Tensor:
        if k.endswith(SCALE_SUFFIX):
            return quantized(k[: -len(SCALE_SUFFIX)])[1]
        if fp8 and is_fp8_linear(k):
            return quantized(k)[0]
        t = weight(k)  # copied: a shard must not share storage with the model (or the MTP's embedding copy with it)
        return t.to(dtype if t.is_floating_point() and not k.endswith("e_score_correction_bias") else t.dtype, copy=True).contiguous()

    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def quantized(k: str) -> tuple[torch.Tensor, torch.Tensor]:
        if k not in cache:  # the weight and its scale are written to the same shard, one after the other
            from sputnik_kernels.fp8 import fp8_quantize_weight_reference

            cache.clear()
            cache[k] = tuple(x.contiguous() for x in fp8_quantize_weight_reference(weight(k).float(), FP8_BLOCK))
        return cache[k]

    def from_meta(name: str, expert: int | None) -> torch.Tensor:
        return meta[name] if expert is None else meta[name][expert]

    def nbytes(k: str) -> int:
        if k.endswith(SCALE_SUFFIX):
            N, K = split(k[: -len(SCALE_SUFFIX)], from_meta).shape
            return 4 * -(-N // FP8_BLOCK) * -(-K // FP8_BLOCK)
        t = split(k, from_meta)
        if fp8 and is_fp8_linear(k):
            return t.numel()
        return t.numel() * (torch.empty(0, dtype=dtype).element_size() if t.is_floating_point() else t.element_size())

    ordered = []
    for k in names:
        ordered.append(k)
        if fp8 and is_fp8_linear(k):
            ordered.append(k + SCALE_SUFFIX)
    main = [k for k in ordered if not in_mtp(k) or mtp == "inline"]
    extra = [k for k in ordered if in_mtp(k) and mtp == "separate"]
    max_bytes = parse_size(max_shard_size)
    _write_set(path, "model", main, tensor, nbytes, max_bytes)
    _write_set(path, MTP_STEM, extra, tensor, nbytes, max_bytes)

    config = to_hf_config(args, mtp=mtp != "none", special_ids=ids)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if fp8:
        config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    gen = {k: v for k, v in ids.items() if v is not None}
    if stops:
        gen["eos_token_id"] = stops if len(stops) > 1 else stops[0]
    (path / "generation_config.json").write_text(json.dumps({"_from_model_config": False, **gen}, indent=2))
