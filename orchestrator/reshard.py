"""Resuming a pretraining (or GRPO learner) checkpoint at another world size, expert-parallel layout
or ZeRO stage.

DeepSpeed's `load_checkpoint` wants the world size, ZeRO stage and parameter set it saved with.
When one of them changed (orchestrator/checkpoints.py: `load_pretrain_part` calls `needs_reshard`),
every rank instead reads the checkpoint's full per-parameter state — fp32 master weight and AdamW's
exp_avg / exp_avg_sq — merged from every rank's `*_optim_states.pt` (the merge of DeepSpeed's
zero_to_fp32.py, applied to the moments as well as to the weights), adds the owned experts' parts
(orchestrator/expert_shard.py), and sets its own share: into the new engine through DeepSpeed's
tensor-fragment API (ZeRO 1/2) or its partitions (ZeRO 3), into the module's parameters, and into
the new ExpertShard (its slice). AdamW's step count, the LR scheduler, the engine's step counters and
the balancing biases (buffers) are restored too, so the run continues exactly as an uninterrupted
one would. Experts move freely between the engine (EP 1 or replicated experts: ordinary DeepSpeed
parameters) and ExpertShards of any degree.

Why not DeepSpeed's universal checkpoint (`ds_to_universal` + `checkpoint.load_universal`): it needs
an offline conversion and a config flag known before the engine is built, and it cannot move the
owned experts, which DeepSpeed never sees, into or out of the engine (its MoE support has open bugs).

The global batch (micro_batch_size x workers x grad_accum) and the loader's rows per micro-batch
must stay the same: the loader's saved position counts micro-batches of that many rows.

The checkpoint's files are memory-mapped and each parameter's full state (weight and two moments,
fp32) is assembled when it is set and dropped after: a rank holds its own share plus one parameter's
full state at a time, not the model's (a 671B checkpoint cannot be held whole by any rank); the pages
read from the files are the kernel's page cache, not the process's memory.

GRPO's learners (orchestrator/grpo/learner.py) use the same path when `grpo.learners`, their ZeRO
stage or `grpo.expert_parallel` changed between the save and the resume.

Test: `pytest tests/orchestrator/test_orch_expert_shard.py -k reshard` (save at 4 workers / EP 2,
resume at 2 workers / EP 2 and at 1 worker / EP 1 on the uninterrupted run's losses);
`pytest tests/orchestrator/test_orch_grpo.py -k reshard` (GRPO learners).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

MOMENTS = ("exp_avg", "exp_avg_sq")
PREFIX = "model."  # the engine wraps the Transformer as `.model` (pretrain_worker.LossModule)


def needs_reshard(meta: dict, engine, world: int, experts, owned: bool) -> bool:
    """Whether DeepSpeed cannot load the checkpoint itself: another world size, ZeRO stage, or
    experts moved into or out of the engine (`owned`: the checkpoint has owned experts)."""
    stage = meta.get("zero_stage", engine.zero_optimization_stage())  # older checkpoints: assume unchanged
    return meta["world_size"] != world or stage != engine.zero_optimization_stage() or owned != (experts is not None)


def check_batch(meta: dict, engine, path: Path, world: int, section: str = "pretrain") -> None:
    """The resumed run must see the same batches: the loaders' saved position counts micro-batches of
    micro_batch_size x workers rows (data/loader.py), grad_accum of them per step. Refuse another."""
    if "micro_batch_size" not in meta:
        return
    rows, accum = meta["micro_batch_size"] * meta["world_size"], meta["grad_accum"]
    now_rows, now_accum = engine.train_micro_batch_size_per_gpu() * world, engine.gradient_accumulation_steps()
    if (rows, accum) != (now_rows, now_accum):
        raise RuntimeError(
            f"checkpoint {path} was trained with {section}.micro_batch_size {meta['micro_batch_size']} x {_workers(meta['world_size'])} "
            f"= {rows} rows per micro-batch and {section}.grad_accum {accum}; this run has {now_rows} rows and grad_accum "
            f"{now_accum}: set {section}.micro_batch_size to {rows} / workers and {section}.grad_accum to {accum} so "
            f"the data continues where it stopped")


def load_resharded(engine, path: Path, meta: dict, *, world: int, experts=None, job: str = "pretrain",
                   experts_at: Path | None = None) -> None:
    """Restore `engine` (and `experts`) from the checkpoint in `path` (DeepSpeed's files in
    path/meta["tag"], owned experts' parts in `experts_at`, default `path`) whatever world size, EP
    degree and ZeRO stage it was saved with (call on every rank)."""
    from orchestrator.expert_shard import ExpertCheckpoint, expert_layout, owned_slice

    check_batch(meta, engine, path, world, section=job)
    ds_dir = Path(path) / meta["tag"]
    experts_at = Path(path) if experts_at is None else Path(experts_at)
    full, buffers, states = read_full_state(ds_dir)
    layout = expert_layout(experts_at)
    if layout is not None and experts is None:  # owned experts join the engine's parameters
        saved = ExpertCheckpoint(experts_at)
        full.update({PREFIX + k: (lambda k=k: saved.read(k)) for k in layout["n_experts"]})
    if experts is not None:
        if layout is not None:
            experts.load(experts_at)
        else:  # the engine's experts become this rank's ExpertShard
            step = float(states["step"])
            for k in experts.master:  # one key at a time
                experts.load_state({k: {n: t[owned_slice(experts, len(t))] for n, t in full.pop(PREFIX + k)().items()},
                                    "step": step}, keys=[k])
    set_engine_state(engine, full, buffers, states)
    if dist.get_rank() == 0:
        print(f"{job}: resuming checkpoint {path} saved at {_workers(meta['world_size'])} / EP {meta.get('expert_parallel', 1)} "
              f"on {_workers(world)} / EP {experts.ep if experts is not None else 1}: weights and optimizer state resharded",
              flush=True)


def _workers(n: int) -> str:
    return f"{n} worker{'s' if n > 1 else ''}"


# ---------------------------------------------------------------------------------------------
# Reading: every parameter's full fp32 weight and moments from all ranks' files
# ---------------------------------------------------------------------------------------------


def read_full_state(ds_dir: Path) -> tuple[dict, dict, dict]:
    """({parameter name: a function returning its {"weight", "exp_avg", "exp_avg_sq"} full fp32
    tensors, or those of the names it is given, `(keys, rows)`: only rows `rows` (a slice of the
    first dimension, e.g. some of a layer's stacked experts)}, {buffer name: tensor}, {"step": AdamW's step count, "global_steps", "global_samples",
    "skipped_steps", "lr_scheduler", "shared_params"}) of a DeepSpeed checkpoint folder (`<ckpt>/ds`) saved with
    ZeRO 0-3 at any world size. The files are memory-mapped and a parameter's state is assembled only
    when asked for, so a rank holds one parameter's full state at a time, not the model's."""
    zero3 = (ds_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()  # ZeRO 3: one per rank, else one
    ms = torch.load(ds_dir / ("zero_pp_rank_0_mp_rank_00_model_states.pt" if zero3 else "mp_rank_00_model_states.pt"),
                    map_location="cpu", mmap=True, weights_only=False)
    buffers = {k: v for k, v in ms["module"].items() if k in ms["buffer_names"]}
    states = {k: ms[k] for k in ("global_steps", "global_samples", "skipped_steps", "lr_scheduler")}
    states["shared_params"] = dict(ms.get("shared_params") or {})  # {alias: source} of tied weights, stored once
    if ms["optimizer"] is not None:  # ZeRO 0: the module and torch's optimizer state, whole
        full, states["step"] = _zero0_state(ms)
        return full, buffers, states
    optim_files = sorted(ds_dir.glob("*optim_states.pt"), key=lambda f: int(f.name.split("rank_")[1].split("_")[0]))
    osds = [torch.load(f, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"] for f in optim_files]
    full = _zero3_merge(osds, ms["param_shapes"]) if zero3 else _zero12_merge(osds, ms["param_shapes"])
    base = _base_state(osds[0], 0)
    states["step"] = float(base["step"]) if "step" in base else 0.0
    return full, buffers, states


def _base_state(osd: dict, group: int) -> dict:
    """The torch optimizer's state of flat partition `group` ({} before the first step): a torch
    state dict (rigid checkpoints; ZeRO 3's under OPTIMIZER_STATE_DICT) or a list (ZeRO 1/2 elastic)."""
    base = osd["base_optimizer_state"] if "base_optimizer_state" in osd else osd["optimizer_state_dict"]
    if isinstance(base, list):
        return base[group]
    ids = [i for g in base["param_groups"] for i in g["params"]]  # one flat partition per (sub-)group, in order
    return base["state"].get(ids[group], {})


def _flat(osds: list[dict], key: str, weights_key: str) -> list[list[torch.Tensor]]:
    """Per rank, per flat group: the fp32 weights (`key` "weight") or a moment (memory-mapped views),
    cut to the weights' length (ZeRO 1/2 save weights without the last rank's padding, moments with
    it); None for a moment before any step (zeros)."""
    out = []
    for osd in osds:
        weights = osd[weights_key]
        if key == "weight":
            out.append(list(weights))
        else:
            out.append([_base_state(osd, g)[key][:w.numel()] if key in _base_state(osd, g) else None
                        for g, w in enumerate(weights)])
    return out


def flat_span(pieces: list[torch.Tensor | None], lengths: list[int], lo: int, hi: int) -> torch.Tensor:
    """Elements [lo, hi) of the concatenation of `pieces` (of `lengths`; a None piece reads as
    zeros), copied out of the pieces that hold them."""
    out, start = [], 0
    for t, n in zip(pieces, lengths):
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            out.append(t[a - start:b - start] if t is not None else torch.zeros(b - a))
        start += n
    return torch.cat(out)


def _rows(shape, rows: slice | None) -> tuple[int, int, tuple]:
    """(first element, element count, shape) of rows `rows` (a slice of the first dimension; all of
    them when None) of a tensor of `shape` stored flat."""
    if rows is None:
        return 0, math.prod(shape), tuple(shape)
    start, stop, step = rows.indices(shape[0])
    if step != 1 or stop < start:
        raise ValueError(f"rows {rows} of a tensor of shape {tuple(shape)}: a contiguous range is needed")
    row = math.prod(shape[1:])
    return start * row, (stop - start) * row, (stop - start, *shape[1:])


def _zero12_merge(osds: list[dict], param_shapes: list[dict]) -> dict:
    """ZeRO 1/2: each flat group is the ranks' partitions end to end, the parameters in order (with
    DeepSpeed's per-parameter alignment padding, if any, after each)."""
    pads = osds[0].get("param_alignment_paddings")
    per_key = {key: _flat(osds, key, "single_partition_of_fp32_groups") for key in ("weight", *MOMENTS)}
    lengths = [[r[g].numel() for r in per_key["weight"]] for g in range(len(param_shapes))]
    full: dict = {}
    for g, shapes in enumerate(param_shapes):
        offset = 0
        for j, (name, shape) in enumerate(shapes.items()):
            n = math.prod(shape)

            def state(keys=tuple(per_key), rows=None, g=g, lo=offset, shape=shape):
                a, m, sub = _rows(shape, rows)
                return {key: flat_span([r[g] for r in per_key[key]], lengths[g], lo + a, lo + a + m).view(sub) for key in keys}
            full[name] = state
            offset += n + (pads[g][j] if pads else 0)
    return full


def _zero3_merge(osds: list[dict], param_shapes: list[dict]) -> dict:
    """ZeRO 3: every parameter is split into `world` equal padded pieces; rank r's flat groups hold
    its piece of every parameter, in order."""
    world, full = len(osds), {}
    shapes = {k: v for d in param_shapes for k, v in d.items()}
    per_key = {key: _flat(osds, key, "fp32_flat_groups") for key in ("weight", *MOMENTS)}
    lengths = [w.numel() for w in per_key["weight"][0]]  # every rank's groups have the same sizes
    offset = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        piece = math.ceil(n / world)

        def state(keys=tuple(per_key), rows=None, lo=offset, piece=piece, shape=shape):
            a, m, sub = _rows(shape, rows)  # elements [a, a + m) of the parameter: rank r holds [r * piece, (r + 1) * piece)
            spans = [(r, max(a, r * piece), min(a + m, (r + 1) * piece)) for r in range(world)]
            return {key: torch.cat([flat_span(per_key[key][r], lengths, lo + x - r * piece, lo + y - r * piece)
                                    for r, x, y in spans if x < y]).view(sub) for key in keys}
        full[name] = state
        offset += piece
    assert offset == sum(lengths), (offset, sum(lengths))
    return full


def _zero0_state(ms: dict) -> tuple[dict, float]:
    """ZeRO 0: the fp32 module and torch's optimizer state, indexed in the parameters' order."""
    names = [k for k in ms["module"] if k not in ms["buffer_names"]]
    opt = ms["optimizer"]
    if "state" not in opt:
        raise RuntimeError("resharding a ZeRO-0 checkpoint is supported for fp32 runs only (torch's optimizer state); "
                           "resume it at its own world size and expert layout, or use ZeRO 1-3")
    ids = [i for g in opt["param_groups"] for i in g["params"]]
    assert len(ids) == len(names), f"{len(ids)} optimizer entries for {len(names)} parameters (tied weights?)"
    full, step = {}, 0.0
    for name, i in zip(names, ids):
        s = opt["state"].get(i, {})

        def state(keys=("weight", *MOMENTS), rows=None, name=name, s=s):
            part = (lambda t: t) if rows is None else (lambda t: t[rows])
            w = part(ms["module"][name]).float()
            return {k: w if k == "weight" else part(s[k]) if k in s else torch.zeros_like(w) for k in keys}
        full[name] = state
        step = float(s["step"]) if "step" in s else step
    return full, step


# ---------------------------------------------------------------------------------------------
# Writing: this rank's share into the new engine
# ---------------------------------------------------------------------------------------------


def set_engine_state(engine, full: dict, buffers: dict, states: dict) -> None:
    """Set every engine parameter's weight and moments from `full` ({name: a function returning its
    full state}), the buffers, AdamW's step count, the LR scheduler and the engine's step counters."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    named = dict(engine.module.named_parameters())
    if named.keys() != full.keys():
        raise RuntimeError(f"the checkpoint's parameters do not match the model's: missing {sorted(named.keys() - full.keys())[:5]}, "
                           f"unexpected {sorted(full.keys() - named.keys())[:5]} (another model config?)")
    stage, opt, step = engine.zero_optimization_stage(), engine.optimizer, states["step"]
    if step > 0:
        _create_moments(engine, step)
    with torch.no_grad():
        for name, p in named.items():
            t = full[name]()  # this parameter's full state, read now and dropped after
            if stage == 0:
                p.copy_(t["weight"])
                if step > 0:
                    opt.state[p].update({k: t[k].clone() for k in MOMENTS})
            elif stage in (1, 2):
                safe_set_full_fp32_param(p, t["weight"])
                for k in MOMENTS if step > 0 else ():
                    safe_set_full_optimizer_state(p, t[k], k)
                p.copy_(t["weight"].to(p.dtype))  # the module's weights: whole on every rank
            else:
                _set_zero3(opt, p, t, step > 0)
        for name, b in engine.module.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
    scheduler = engine.lr_scheduler  # none in GRPO's learners (a constant lr)
    if scheduler is not None and states.get("lr_scheduler") is not None:
        scheduler.load_state_dict(states["lr_scheduler"])
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):  # as the saved optimizer had them
            group["lr"] = lr
    engine.global_steps, engine.skipped_steps = states["global_steps"], states["skipped_steps"]
    engine.global_samples = states["global_samples"]


def _create_moments(engine, step: float) -> None:
    """AdamW's state of every flat fp32 partition (DeepSpeed creates it lazily, at the first step),
    zero moments at step count `step`, linked to the parameters' fragments (ZeRO 1/2)."""
    stage, opt = engine.zero_optimization_stage(), engine.optimizer
    if stage == 0:
        if not isinstance(opt, torch.optim.Optimizer):  # bf16 under ZeRO 0: DeepSpeed's BF16_Optimizer
            raise RuntimeError("resharding into a ZeRO-0 bf16 run is not supported: use pretrain.zero_stage 1-3, "
                               "or resume at the checkpoint's world size and expert layout")
        flats, base = [p for g in opt.param_groups for p in g["params"]], opt
    elif stage in (1, 2):
        flats, base = opt.single_partition_of_fp32_groups, opt.optimizer
    else:
        flats, base = opt.fp32_partitioned_groups_flat, opt.optimizer
    for f in flats:
        base.state[f] = {"step": torch.tensor(step), **{k: torch.zeros_like(f) for k in MOMENTS}}
    if stage in (1, 2):  # the fragments DeepSpeed's safe_set_full_optimizer_state writes through
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _set_zero3(opt, p, t: dict, moments: bool) -> None:
    """This rank's piece of a ZeRO-3 parameter: fp32 master, moments and the module's partition.
    (DeepSpeed's safe_set_full_* narrow past the end of the value on the last rank when the
    parameter's size is not a multiple of the world size, so the pieces are cut here, padded.)"""
    n, rank = p.partition_numel(), opt._get_param_partition_rank(p)
    for key in ("weight", *MOMENTS) if moments else ("weight",):
        value = t[key].flatten()
        piece = F.pad(value, (0, n * dist.get_world_size(group=opt._get_param_partition_group(p)) - value.numel()))
        hp, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=None if key == "weight" else key)
        hp.copy_(piece.narrow(0, n * rank, n))
        if key == "weight":
            p.ds_tensor.copy_(piece.narrow(0, n * rank, n).to(p.ds_tensor.dtype))
            if p.data.numel() == value.numel():  # a persistent (never partitioned) parameter holds the whole
                p.data.copy_(value.view_as(p.data).to(p.dtype))
