"""Import a Hugging Face DeepseekV3 checkpoint directory into our Transformer.

Reads what DeepSeek-V3/R1 and Moonlight publish: config.json and safetensors, one file or shards
listed in `model.safetensors.index.json`; bf16/fp32 tensors, or FP8 e4m3 linear weights with a
float32 `weight_scale_inv` per block (config `quantization_config.weight_block_size`), dequantised
as DeepSeek's `weight_dequant` does (q.float() * scale per block); MTP layers after the last layer,
in the main shards (the hub) or in `mtp*.safetensors` beside them (our export, see save.py).

Every tensor is accounted for: an index entry without its shard, a shard the index does not list,
a tensor of no known name, or a known one missing is an error naming it. Memory: the model is
allocated once (uninitialised), then each shard is opened in turn and its tensors are read one at
a time (safetensors' lazy reads) and copied in, so the peak is about the model plus one shard.

Test: `pytest tests/model/test_model_hf.py tests/model/test_model_hf_hub.py`;
memory: `python benchmarks/hf_import_memory.py`.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from model.args import ModelArgs
from model.hf.config import SCALE_SUFFIX, from_hf_config, key_map, mtp_prefixes
from model.rope import precompute_freqs_cis
from model.transformer import Transformer

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
MTP_STEM = "mtp"  # our export's separate MTP tensors: mtp.safetensors, or mtp-*.safetensors + mtp.safetensors.index.json


def _tensor_set(path: Path, stem: str, files: list[Path]) -> dict[str, Path]:
    """Tensor name -> file for one set of safetensors files: `<stem>.safetensors.index.json` and
    its shards, or (no index) each file of `files`, every key checked against its file's header."""
    index = path / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a safetensors index (no weight_map: {e})") from None
        listed = set(weight_map.values())
        for name in sorted(listed):
            if not (path / name).is_file():
                raise ValueError(f"{index} lists shard {name}, which is missing from {path}")
        for f in files:
            if f.name not in listed:
                raise ValueError(f"{path}: shard {f.name} is not listed in {index.name}")
        by_file = defaultdict(set)
        for k, name in weight_map.items():
            by_file[name].add(k)
        for name, keys in by_file.items():
            with safe_open(str(path / name), framework="pt") as fh:
                have = set(fh.keys())
            if keys - have:
                raise ValueError(f"{index.name} places tensor {sorted(keys - have)[0]!r} in {name}, which does not hold it")
            if have - keys:
                raise ValueError(f"{path / name} holds tensor {sorted(have - keys)[0]!r}, which {index.name} does not list")
        return {k: path / name for k, name in weight_map.items()}
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                if k in out:
                    raise ValueError(f"{path}: tensor {k!r} is in both {out[k].name} and {f.name}")
                out[k] = f
    return out


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Every tensor name of the checkpoint directory -> the safetensors file holding it."""
    is_mtp = lambda f: f.name == f"{MTP_STEM}.safetensors" or f.name.startswith(f"{MTP_STEM}-")
    all_files = sorted(path.glob("*.safetensors"))
    if not all_files:
        raise FileNotFoundError(f"{path} holds no *.safetensors files")
    main = _tensor_set(path, "model", [f for f in all_files if not is_mtp(f)])
    mtp = _tensor_set(path, MTP_STEM, [f for f in all_files if is_mtp(f)])
    both = main.keys() & mtp.keys()
    if both:
        raise ValueError(f"{path}: tensor {sorted(both)[0]!r} is in both the model and the MTP files")
    return {**main, **mtp}


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek's weight_dequant in fp32: q[N, K] * scale_inv[ceil(N/bn), ceil(K/bk)] per bn x bk block."""
    bn, bk = block
    N, K = q.shape
    if scale_inv.shape != (-(-N // bn), -(-K // bk)):
        raise ValueError(f"scale of shape {tuple(scale_inv.shape)} does not tile a [{N}, {K}] weight in {bn}x{bk} blocks")
    s = scale_inv.float().repeat_interleave(bn, dim=0)[:N].repeat_interleave(bk, dim=1)[:, :K]
    return q.float() * s


def _fp8_block(cfg: dict) -> tuple[int, int]:
    q = cfg.get("quantization_config") or {}
    block = q.get("weight_block_size") or [128, 128]
    return int(block[0]), int(block[1])


@torch.no_grad()
def _init_mtp(model: Transformer) -> None:
    """Fresh MTP modules, initialised as Transformer.reset_parameters does."""
    for name, p in model.mtp.named_parameters():
        p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, model.args.init_std)
    for mod in model.mtp:
        if hasattr(mod.block.ffn, "gate"):
            mod.block.ffn.gate.bias.zero_()


def from_hf_pretrained(path: str | Path, *, experts: tuple[int, int] | None = None) -> Transformer:
    """Build our Transformer (fp32) from a Hugging Face DeepseekV3 checkpoint directory.
    experts=(part, k): only routed experts [part * E/k, (part + 1) * E/k) of every MoE layer are
    allocated and read (the others are never materialised): the shard an expert-parallel rank owns,
    ready for model.parallel.apply_expert_parallel."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} does not exist (expected a Hugging Face checkpoint directory)")
    cfg = json.loads(cfg_file.read_text())
    args: ModelArgs = from_hf_config(cfg)
    files = checkpoint_files(path)
    with torch.device("meta"):
        model = Transformer(args)
    owned = range(args.n_routed_experts)
    if experts is not None:
        part, k = experts
        if args.n_routed_experts % k or not 0 <= part < k:
            raise ValueError(f"expert part {part} of {k}: {k} must divide n_routed_experts {args.n_routed_experts}")
        owned = range(part * args.n_routed_experts // k, (part + 1) * args.n_routed_experts // k)
        for moe in model.moe_layers():
            for w in ("w1", "w2", "w3"):
                full = getattr(moe.experts, w)
                setattr(moe.experts, w, torch.nn.Parameter(torch.empty(len(owned), *full.shape[1:], device="meta")))
    model = model.to_empty(device="cpu")  # one uninitialised copy; the checkpoint fills it
    model.freqs_cis = precompute_freqs_cis(args)
    if args.tie_embeddings:
        model.head.weight = model.embed.weight
    names = key_map(model)

    def owner(k: str) -> str | None:  # the weight a `_scale_inv` tensor belongs to
        return k[: -len(SCALE_SUFFIX)] if k.endswith(SCALE_SUFFIX) and k[: -len(SCALE_SUFFIX)] in names else None

    for k, f in files.items():
        if k not in names and owner(k) is None:
            raise ValueError(f"{f}: tensor {k!r} is not part of a DeepseekV3 model with this config.json "
                             f"(wrong config, or a checkpoint of another architecture)")
    mtp = mtp_prefixes(args)
    has_mtp = any(k.startswith(mtp) for k in files) if mtp else False
    shared_copies = ("shared_head.head.weight", "embed_tokens.weight")  # MTP's copies of the shared embedding/head
    wanted: dict[Path, list[str]] = defaultdict(list)
    for hf in names:
        in_mtp = bool(mtp) and hf.startswith(mtp)
        if (in_mtp and hf.endswith(shared_copies)) or (args.tie_embeddings and hf == "lm_head.weight"):
            continue  # copies of tensors our model shares: the main embedding / head is read once
        expert = names[hf][0].partition("#")[2]
        if expert and int(expert) not in owned:
            continue  # another rank's expert
        if hf in files:
            wanted[files[hf]].append(hf)
        elif not (in_mtp and not has_mtp):  # transformers saves no MTP layers: those start fresh (below)
            raise ValueError(f"{path}: tensor {hf!r} is missing from the checkpoint")

    sd = model.state_dict()
    block = _fp8_block(cfg)
    for f, keys in wanted.items():  # one shard at a time: its pages are released when it closes
        with safe_open(str(f), framework="pt") as fh:
            for hf in keys:
                t = fh.get_tensor(hf)
                scale_name = hf + SCALE_SUFFIX
                if t.dtype in FP8_DTYPES:
                    if scale_name not in files:
                        raise ValueError(f"{f}: FP8 tensor {hf!r} has no {scale_name!r}")
                    if files[scale_name] == f:
                        scale = fh.get_tensor(scale_name)
                    else:
                        with safe_open(str(files[scale_name]), framework="pt") as other:
                            scale = other.get_tensor(scale_name)
                    try:
                        t = dequantize_fp8(t, scale, block)
                    except ValueError as e:
                        raise ValueError(f"{f}: tensor {hf!r}: {e}") from None
                elif scale_name in files:
                    raise ValueError(f"{files[scale_name]}: {scale_name!r} scales {hf!r}, which is {t.dtype}, not FP8")
                ours, transpose = names[hf]
                name, _, expert = ours.partition("#")
                target = sd[name][int(expert) - owned.start] if expert else sd[name]
                if transpose:
                    t = t.t()
                if t.shape != target.shape:
                    raise ValueError(f"{path}: tensor {hf!r} has shape {tuple(t.shape)}, expected {tuple(target.shape)}")
                target.copy_(t)
                del t
    if args.mtp_depth and not has_mtp:
        _init_mtp(model)
        warnings.warn(f"{path} holds no MTP layers; the {args.mtp_depth} MTP module(s) start freshly initialised", stacklevel=2)
    for m in model.moe_layers():
        m.load.zero_()
    return model
