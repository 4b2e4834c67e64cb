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

import contextlib
import json
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from model.args import ModelArgs
from model.hf.config import SCALE_SUFFIX, from_hf_config, key_map, mtp_prefixes
from model.parallel import expert_slice
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
def _finish(model: Transformer, has_mtp: bool, path: Path, whole=None) -> Transformer:
    """Fresh MTP modules where the checkpoint holds none (initialised as Transformer.reset_parameters
    does), expert loads zeroed. `whole(p)`: a context in which parameter p is whole, yielding whether
    this rank writes it (ZeRO-3: gathered, rank 0); None: every parameter is whole here."""
    args = model.args
    if args.mtp_depth and not has_mtp:
        for name, p in model.mtp.named_parameters():
            with whole(p) if whole else contextlib.nullcontext(True) as mine:
                if mine:
                    p.data.fill_(1.0) if name.endswith("norm.weight") else p.data.normal_(0.0, args.init_std)
        for mod in model.mtp:
            if hasattr(mod.block.ffn, "gate"):
                mod.block.ffn.gate.bias.zero_()
        warnings.warn(f"{path} holds no MTP layers; the {args.mtp_depth} MTP module(s) start freshly initialised", stacklevel=3)
    for m in model.moe_layers():
        m.load.zero_()
    return model


def hf_model_args(path: str | Path) -> ModelArgs:
    """The ModelArgs of a checkpoint directory's config.json."""
    return _read_config(Path(path))[1]


def _read_config(path: Path) -> tuple[dict, ModelArgs]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} does not exist (expected a Hugging Face checkpoint directory)")
    cfg = json.loads(cfg_file.read_text())
    return cfg, from_hf_config(cfg)


class _Reader:
    """Which checkpoint tensor fills which of `model`'s (validated: every tensor of the directory
    known, every tensor the model needs present), and reading one in our layout (FP8 dequantised,
    transposed where ours is)."""

    def __init__(self, path: Path, model: Transformer, cfg: dict, owned: range):
        args = model.args
        self.path, self.files, self.block, self.names = path, checkpoint_files(path), _fp8_block(cfg), key_map(model)
        for k, f in self.files.items():
            if k not in self.names and self._owner(k) is None:
                raise ValueError(f"{f}: tensor {k!r} is not part of a DeepseekV3 model with this config.json "
                                 f"(wrong config, or a checkpoint of another architecture)")
        mtp = mtp_prefixes(args)
        self.has_mtp = any(k.startswith(mtp) for k in self.files) if mtp else False
        shared_copies = ("shared_head.head.weight", "embed_tokens.weight")  # MTP's copies of the shared embedding/head
        self.by_file: dict[Path, list[str]] = defaultdict(list)
        self.by_target: dict[str, list[str]] = defaultdict(list)  # our tensor -> the checkpoint tensors that fill it
        for hf in self.names:
            in_mtp = bool(mtp) and hf.startswith(mtp)
            if (in_mtp and hf.endswith(shared_copies)) or (args.tie_embeddings and hf == "lm_head.weight"):
                continue  # copies of tensors our model shares: the main embedding / head is read once
            name, _, expert = self.names[hf][0].partition("#")
            if expert and int(expert) not in owned:
                continue  # another rank's expert
            if hf in self.files:
                self.by_file[self.files[hf]].append(hf)
                self.by_target[name].append(hf)
            elif not (in_mtp and not self.has_mtp):  # transformers saves no MTP layers: those start fresh
                raise ValueError(f"{path}: tensor {hf!r} is missing from the checkpoint")

    def _owner(self, k: str) -> str | None:  # the weight a `_scale_inv` tensor belongs to
        return k[: -len(SCALE_SUFFIX)] if k.endswith(SCALE_SUFFIX) and k[: -len(SCALE_SUFFIX)] in self.names else None

    def read(self, fh, hf: str) -> torch.Tensor:
        """Checkpoint tensor `hf` from its open file `fh`, as our tensor holds it."""
        f, files = self.files[hf], self.files
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
                t = dequantize_fp8(t, scale, self.block)
            except ValueError as e:
                raise ValueError(f"{f}: tensor {hf!r}: {e}") from None
        elif scale_name in files:
            raise ValueError(f"{files[scale_name]}: {scale_name!r} scales {hf!r}, which is {t.dtype}, not FP8")
        return t.t() if self.names[hf][1] else t

    def copy(self, hf: str, t: torch.Tensor, target: torch.Tensor, owned: range) -> None:
        """Copy checkpoint tensor `hf` (as `read` gives it) into our tensor `target` (for an
        expert: the layer's stacked experts)."""
        expert = self.names[hf][0].partition("#")[2]
        if expert:
            target = target[int(expert) - owned.start]
        if t.shape != target.shape:
            raise ValueError(f"{self.path}: tensor {hf!r} has shape {tuple(t.shape)}, expected {tuple(target.shape)}")
        target.copy_(t)


def _owned(args: ModelArgs, experts: tuple[int, int] | None) -> range:
    if experts is None:
        return range(args.n_routed_experts)
    part, k = experts
    if args.n_routed_experts % k or not 0 <= part < k:
        raise ValueError(f"expert part {part} of {k}: {k} must divide n_routed_experts {args.n_routed_experts}")
    sl = expert_slice(args.n_routed_experts, part, k)
    return range(sl.start, sl.stop)


@torch.no_grad()
def from_hf_pretrained(path: str | Path, *, experts: tuple[int, int] | None = None,
                       dtype: torch.dtype = torch.float32) -> Transformer:
    """Build our Transformer from a Hugging Face DeepseekV3 checkpoint directory, its
    parameters in `dtype` (bf16: each tensor rounded once as it is read, never an fp32 copy of the
    whole model; the MoE balancing buffers stay fp32, as under DeepSpeed's bf16 mode). experts=(part, k): only routed
    experts [part * E/k, (part + 1) * E/k) of every MoE layer are allocated and read (the others are
    never materialised): the shard an expert-parallel rank owns, ready for
    model.parallel.apply_expert_parallel."""
    path = Path(path)
    cfg, args = _read_config(path)
    with torch.device("meta"):
        model = Transformer(args)
    owned = _owned(args, experts)
    if experts is not None:
        for moe in model.moe_layers():
            for w in ("w1", "w2", "w3"):
                full = getattr(moe.experts, w)
                setattr(moe.experts, w, torch.nn.Parameter(torch.empty(len(owned), *full.shape[1:], device="meta")))
    model = model.to(dtype).to_empty(device="cpu")  # one uninitialised copy; the checkpoint fills it
    model.freqs_cis = precompute_freqs_cis(args)
    if args.tie_embeddings:
        model.head.weight = model.embed.weight
    reader = _Reader(path, model, cfg, owned)
    sd = model.state_dict()
    for f, keys in reader.by_file.items():  # one shard at a time: its pages are released when it closes
        with safe_open(str(f), framework="pt") as fh:
            for hf in keys:
                reader.copy(hf, reader.read(fh, hf), sd[reader.names[hf][0].partition("#")[0]], owned)
    return _finish(model, reader.has_mtp, path)


@torch.no_grad()
def from_hf_pretrained_zero3(path: str | Path, ds_config: dict) -> Transformer:
    """The model built under DeepSpeed's `zero.Init` (each rank allocates only its 1/world of every
    parameter as it is created) and filled one parameter at a time: every rank gathers it, rank 0
    reads the checkpoint tensors that make it, and DeepSpeed partitions it again on leaving the
    gather. A rank's peak is its partition of the model plus one whole parameter (and, on rank 0,
    the checkpoint tensor being read): how a ZeRO-3 learner starts from a model larger than one
    device (issue 19). Buffers (the balancing bias) are read by every rank. Call on every rank of
    the default process group, then `deepspeed.initialize` with the same config."""
    import deepspeed
    import torch.distributed as dist

    path = Path(path)
    cfg, args = _read_config(path)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = Transformer(args)
    owned = range(args.n_routed_experts)
    reader = _Reader(path, model, cfg, owned)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    rank0 = dist.get_rank() == 0
    for name, keys in reader.by_target.items():
        with deepspeed.zero.GatheredParameters([params[name]] if name in params else [], modifier_rank=0):
            if name in buffers or rank0:  # the other ranks receive the parameter when the gather ends
                target = buffers[name] if name in buffers else params[name].data
                for hf in keys:
                    with safe_open(str(reader.files[hf]), framework="pt") as fh:
                        reader.copy(hf, reader.read(fh, hf), target, owned)

    @contextlib.contextmanager
    def gathered_on_rank0(prm):
        with deepspeed.zero.GatheredParameters([prm], modifier_rank=0):
            yield rank0

    return _finish(model, reader.has_mtp, path, whole=gathered_on_rank0)
