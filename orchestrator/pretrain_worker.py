"""One pretraining worker: a DeepSpeed engine over the MoE model, fed by the packing loader.

`train_loop({"spec": WorkerSpec(...)})` is what Ray Train runs on every worker. Each optimizer
step: grad-accumulated micro-batches, DeepSpeed step (ZeRO, clipping, warmup + cosine LR), then the
auxiliary-loss-free bias update with expert loads summed over all ranks. Rank 0 writes metrics.jsonl
every `tracking.log_every` steps and the last; the driver sends them to W&B (tracking.MetricsFollower),
so a worker stopped or lost between two records loses none already written. Checkpoints (layout in orchestrator/checkpoints.py): every
rank saves its part and reports it with `ray.train.report(checkpoint=...)`; Ray Train merges the
parts into one directory and, after a worker failure, restarts all workers from the latest one.

Test: `pytest tests/orchestrator/test_orch_pretrain.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from model import ModelArgs, Transformer
from model.parallel import apply_activation_checkpointing, apply_expert_parallel
from orchestrator.checkpoints import load_pretrain_part, save_pretrain_part
from orchestrator.config import PretrainConfig, TrackingConfig
from orchestrator.ds_config import deepspeed_config, import_deepspeed, lr_lambda

LOSSES = ("loss", "ce_loss", "mtp_loss")  # averaged over ranks every step


@dataclasses.dataclass
class WorkerSpec:
    """What every worker needs: its config sections and a few facts of the run."""

    pretrain: PretrainConfig
    model: ModelArgs
    tracking: TrackingConfig
    seed: int
    run_name: str
    run_dir: Path
    shard_dir: Path  # the corpus's token shards (data/prepare.py)
    seq_len: int
    bos_id: int
    eos_id: int
    threads: int = 1  # torch threads per worker on CPU
    peak_flops: float | None = None  # per device, for MFU; None where unknown
    # supervised fine-tuning (orchestrator/sft.py) runs the same loop: the model starts from an HF
    # directory and the batches are packed examples (data/sft.py) with a held-out loss
    job: str = "pretrain"  # the progress lines' prefix
    init_dir: Path | None = None  # start from this HF model instead of a fresh initialisation
    sft_examples: Path | None = None  # encoded training examples (data.sft.save_examples)
    sft_heldout: Path | None = None  # encoded held-out examples
    pad_id: int = 0
    eval_every: int = 0  # steps between held-out evaluations (and the last step); 0: none


class LossModule(nn.Module):
    """What the DeepSpeed engine wraps: forward(tokens, targets) -> (loss, metrics)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens, targets, positions=None, doc=None):
        if doc is None:
            return self.model.loss(tokens, targets)
        from data.sft import doc_mask

        return self.model.loss(tokens, targets, positions_BT=positions, mask_BTS=doc_mask(doc))


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def train_loop(loop_config: dict) -> None:
    """Ray Train's entry point on every worker; `loop_config` is {"spec": WorkerSpec}."""
    import ray.train

    from data.loader import PackedLoader

    spec: WorkerSpec = loop_config["spec"]
    p = spec.pretrain
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        torch.set_num_threads(spec.threads)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")

    model = build_model(spec, rank, world)
    flops_per_token = 6 * model.num_parameters(activated=True)  # before ZeRO-3 partitions the weights
    bf16 = uses_bf16(p, on_gpu)
    experts = own_experts(model, p, rank, world, bf16=bf16)
    engine, scheduler = build_engine(model, p, world, bf16=bf16)
    if experts is not None:
        experts.hook_global_norm(engine)
    if spec.sft_examples is not None:
        from data.sft import SFTLoader, load_examples

        loader = SFTLoader(load_examples(spec.sft_examples), seq_len=spec.seq_len, batch_size=p.micro_batch_size * world,
                           pad_id=spec.pad_id, seed=spec.seed, rank=rank, world_size=world)
        heldout = load_examples(spec.sft_heldout) if spec.sft_heldout is not None else []
    else:
        loader = PackedLoader(spec.shard_dir, seq_len=spec.seq_len, batch_size=p.micro_batch_size * world, bos_id=spec.bos_id,
                              eos_id=spec.eos_id, seed=spec.seed, rank=rank, world_size=world)
        heldout = []
    start_step = resume(engine, loader, rank, world, Path(spec.run_dir), spec.job, experts=experts)

    last_step = min(p.steps, p.stop_after or p.steps)
    log = StepLog(spec, world, flops_per_token, last_step) if rank == 0 else None
    if log is not None:
        log.tracker.drop_after(start_step)  # steps logged after the checkpoint we resumed from run again
    for step in range(start_step + 1, last_step + 1):
        t0 = time.perf_counter()
        losses, loads_LE = train_step(engine, model, loader, p.grad_accum, device, world, experts=experts)
        dt = time.perf_counter() - t0
        extra = {}
        if heldout and (step % spec.eval_every == 0 or step == last_step):
            from orchestrator.sft import heldout_metrics

            extra = heldout_metrics(model, heldout, spec, device, rank, world)
        if log is not None:
            log.step(step, losses, loads_LE, model.expert_bias().cpu(), lr=scheduler.get_last_lr()[0],
                     grad_norm=float(engine.get_global_grad_norm() or 0.0), dt=dt, extra=extra)
        if step % p.checkpoint_every == 0 or step == last_step:
            report_checkpoint(engine, loader, step, rank, world, {"loss": losses["loss"], "step": step}, experts=experts)
    if log is not None:
        log.close()


def build_model(spec: WorkerSpec, rank: int, world: int) -> Transformer:
    """The Transformer, identical on every rank, with FP8, activation checkpointing and expert parallel as configured."""
    p, args = spec.pretrain, spec.model
    torch.manual_seed(spec.seed)  # identical initial weights on every rank
    if spec.init_dir is not None:
        from model.hf import from_hf_pretrained

        owned = p.expert_parallel > 1 and p.expert_weights == "owned"  # then this rank reads only the experts it will own
        if p.zero_stage == 3 and not owned and not p.fp8:  # each rank builds only its partition as it reads (issue 19)
            from model.hf import from_hf_pretrained_zero3

            with torch.device("meta"):
                n_params = Transformer(args).num_parameters(include_mtp=True)
            ds_cfg = ds_config_of(p, world, bf16=uses_bf16(p, torch.cuda.is_available()), n_params=n_params)
            model = from_hf_pretrained_zero3(spec.init_dir, ds_cfg)
        else:
            model = from_hf_pretrained(spec.init_dir, experts=(rank % p.expert_parallel, p.expert_parallel) if owned else None)
    else:
        model = Transformer(args)
    if p.fp8:  # DeepSeek-V3 FP8 linears; parameters stay the master weights (model/fp8.py)
        from model.fp8 import apply_fp8

        converted = apply_fp8(model)
        if rank == 0:
            where = "Triton" if torch.cuda.is_available() else "emulated on CPU"
            print(f"pretrain: FP8 block-scaled GEMMs in {len(converted)} modules ({where})", flush=True)
    if p.activation_checkpointing:
        apply_activation_checkpointing(model)
    if p.expert_parallel > 1 and p.expert_weights == "replicated":
        # consecutive ranks form an expert-parallel group; the weights stay whole (and identical on
        # every rank), so DeepSpeed's data-parallel average is the exact global-batch gradient
        ep = p.expert_parallel
        groups = [dist.new_group(list(range(s, s + ep))) for s in range(0, world, ep)]  # every rank creates every group
        apply_expert_parallel(model, groups[rank // ep], shard_weights=False)
        if rank == 0:
            print(f"pretrain: expert parallel {ep} (replicated weights): each worker computes {args.n_routed_experts // ep} of "
                  f"{args.n_routed_experts} routed experts per MoE layer", flush=True)
    if p.compile:  # the loss, forward and backward, as one graph (issue 24); model.loss and DeepSpeed see the same module
        from model.parallel import apply_compile

        apply_compile(model, ("loss_terms",), backend=p.compile_backend)
    return model


def own_experts(model: Transformer, p: PretrainConfig, rank: int, world: int, *, bf16: bool):
    """With `pretrain.expert_parallel` K > 1 (owned experts): this rank's E/K routed experts per MoE
    layer taken out of the model into an ExpertShard, which reduces, clips and updates them beside
    the DeepSpeed engine; None otherwise."""
    if p.expert_parallel == 1 or p.expert_weights != "owned":
        return None
    from orchestrator.expert_shard import ExpertShard

    shard = ExpertShard(model, ep=p.expert_parallel, rank=rank, world=world, lr=p.lr, betas=tuple(p.betas),
                        weight_decay=p.weight_decay, grad_clip=p.grad_clip,
                        dtype=torch.bfloat16 if bf16 else torch.float32)
    if rank == 0:
        e = model.args.n_routed_experts
        print(f"pretrain: expert parallel {p.expert_parallel}: each worker owns and computes {e // p.expert_parallel} of "
              f"{e} routed experts per MoE layer", flush=True)
    return shard


def uses_bf16(p: PretrainConfig, on_gpu: bool) -> bool:
    """pretrain.precision: auto is bf16 on GPUs, fp32 on CPU."""
    return p.precision == "bf16" or (p.precision == "auto" and on_gpu)


def ds_config_of(p: PretrainConfig, world: int, *, bf16: bool, n_params: int) -> dict:
    return deepspeed_config(
        micro_batch_size=p.micro_batch_size, grad_accum=p.grad_accum, world_size=world,
        zero_stage=p.zero_stage, lr=p.lr, betas=p.betas, weight_decay=p.weight_decay,
        grad_clip=p.grad_clip, bf16=bf16, offload_optimizer=p.offload_optimizer, n_params=n_params)


def build_engine(model: Transformer, p: PretrainConfig, world: int, *, bf16: bool):
    """(DeepSpeed engine over LossModule(model), its LR scheduler)."""
    deepspeed = import_deepspeed()
    # owned experts are no longer parameters; a model built partitioned (ZeRO-3 import) knows its sizes as ds_numel
    ds_cfg = ds_config_of(p, world, bf16=bf16, n_params=sum(getattr(q, "ds_numel", q.numel()) for q in model.parameters()))

    def schedule(optimizer):  # a LambdaLR, so DeepSpeed saves its state in every checkpoint
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_lambda(s, warmup_steps=p.warmup_steps, total_steps=p.steps, min_lr_ratio=p.min_lr_ratio))

    engine, _, _, scheduler = deepspeed.initialize(model=LossModule(model), model_parameters=model.parameters(),
                                                   config=ds_cfg, lr_scheduler=schedule)
    return engine, scheduler


def resume(engine, loader, rank: int, world: int, run_dir: Path, job: str = "pretrain", experts=None) -> int:
    """Restore engine, loader and RNG from the newest checkpoint; the step it was taken after (0: none).

    That is Ray Train's latest registered checkpoint, or a newer complete one in the run directory:
    a worker killed after every rank had written its part but before Ray registered the report
    would otherwise restart from an older checkpoint, or from step 0."""
    import ray.train

    from orchestrator.checkpoints import META, find_checkpoints

    registered = ray.train.get_checkpoint()
    with registered.as_directory() if registered is not None else contextlib.nullcontext() as d:
        reg_step = json.loads((Path(d) / META).read_text())["step"] if d is not None else 0
        on_disk = [c for c in find_checkpoints(run_dir) if c.kind == "pretrain" and c.step > reg_step]
        path = on_disk[-1].ds_dir if on_disk else (Path(d) if d is not None else None)
        if path is None:
            return 0
        step, state = load_pretrain_part(engine, path, rank=rank, world=world, experts=experts, job=job)
    loader.load_state_dict(state["loader"])
    set_rng_state(state["rng"])
    if rank == 0:
        how = "the run directory (newer than Ray Train's last registered one)" if on_disk else "Ray Train's last checkpoint"
        print(f"{job}: resumed from step {step}, from {how}", flush=True)
    return step


def train_step(engine, model: Transformer, loader, grad_accum: int, device, world: int,
               experts=None) -> tuple[dict[str, float], torch.Tensor]:
    """One optimizer step. Returns the LOSSES averaged over micro-batches and ranks, and the expert
    loads loads_LE [MoE layers, routed experts] (tokens routed, summed over ranks) on the CPU.
    `experts` (an ExpertShard): owned experts, reduced before DeepSpeed's step (whose clipping then
    sees their norm) and updated after it at the same learning rate and clip factor."""
    sums: dict[str, float] = {}
    lr = engine.lr_scheduler.get_last_lr()[0]  # this step's (the scheduler moves on in engine.step)
    for i in range(grad_accum):
        batch = next(loader)
        packed = [batch[k].to(device) for k in ("positions", "doc")] if "doc" in batch else []  # SFT: documents kept apart
        loss, metrics = engine(batch["tokens"].to(device), batch["targets"].to(device), *packed)
        engine.backward(loss)
        if experts is not None and i == grad_accum - 1:
            experts.reduce()
        engine.step()  # DeepSpeed updates the weights at the accumulation boundary only
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v / grad_accum
    if experts is not None:
        norm = engine.get_global_grad_norm()
        experts.step(lr, float(norm) if norm is not None else None)
    # auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): loads over the whole data-parallel group
    loads_LE = model.expert_loads().to(device)
    if world > 1:
        dist.all_reduce(loads_LE)
    model.update_expert_bias(loads_LE)
    avg = torch.tensor([sums.get(k, 0.0) for k in LOSSES], device=device)
    if world > 1:
        dist.all_reduce(avg)
        avg /= world
    return dict(zip(LOSSES, avg.tolist())), loads_LE.float().cpu()


class StepLog:
    """Rank 0's metrics: a record in metrics.jsonl and a progress line every `tracking.log_every`
    steps and the last; the expert loads (`expert_load.npy`, and for the driver's W&B heatmap
    `expert_load/step-N.npy`) every `tracking.heatmap_every` steps, whose records are logged too."""

    def __init__(self, spec: WorkerSpec, world: int, flops_per_token: float, last_step: int):
        from orchestrator.tracking import Tracker

        self.spec, self.last_step = spec, last_step
        # metrics.jsonl only: the driver owns the W&B run (orchestrator/pretrain.py)
        self.tracker = Tracker(spec.run_dir, dataclasses.replace(spec.tracking, wandb_mode="disabled"), name=spec.run_name,
                               followed=spec.tracking.wandb_mode != "disabled")
        p = spec.pretrain
        self.tokens_per_step = p.micro_batch_size * p.grad_accum * world * spec.seq_len
        self.flops_per_step = flops_per_token * self.tokens_per_step
        self.peak = spec.peak_flops * world if spec.peak_flops else None

    def step(self, step: int, losses: dict[str, float], loads_LE: torch.Tensor, bias_LE: torch.Tensor, *,
             lr: float, grad_norm: float, dt: float, extra: dict | None = None) -> None:
        heatmap = step % self.spec.tracking.heatmap_every == 0 or step == self.last_step
        if not (heatmap or extra or self.tracker.should_log(step, self.last_step)):
            return
        on_gpu = torch.cuda.is_available()
        # namespaces as in the GRPO runs: train/, perf/, timing/, moe/ (the MTP layer is the last row)
        rec = {**{f"train/{k}": v for k, v in losses.items()}, "train/lr": lr, "train/grad_norm": grad_norm,
               "perf/tokens_per_s": self.tokens_per_step / dt, "timing/step": dt,
               "perf/memory_gb": (torch.cuda.max_memory_allocated() if on_gpu else _rss()) / 1e9}
        if self.peak:
            rec["perf/mfu"] = self.flops_per_step / dt / self.peak
        rel_LE = loads_LE / loads_LE.mean(dim=1, keepdim=True).clamp(min=1e-9)
        names = self.layer_names(len(rel_LE))
        for name, r, b in zip(names, rel_LE, bias_LE):
            rec[f"moe/expert_load_max/{name}"] = r.max().item()
            rec[f"moe/expert_load_min/{name}"] = r.min().item()
            rec[f"moe/expert_bias_norm/{name}"] = b.norm().item()
        if heatmap:
            np.save(Path(self.spec.run_dir) / "expert_load.npy", loads_LE.numpy())
            if self.spec.tracking.wandb_mode != "disabled":
                (Path(self.spec.run_dir) / "expert_load").mkdir(exist_ok=True)
                np.save(heatmap_file(self.spec.run_dir, step), rel_LE.numpy())
        rec.update(extra or {})
        self.tracker.log(rec, step=step)
        held = "".join(f" {k.split('/')[-1].replace('_', ' ')} {v:.4f}" for k, v in (extra or {}).items())
        print(f"{self.spec.job}: step {step}/{self.spec.pretrain.steps} loss {losses['loss']:.4f} lr {lr:.2e} "
              f"{rec['perf/tokens_per_s']:.0f} tok/s{' held-out' + held if held else ''}", flush=True)

    def layer_names(self, n: int) -> list[str]:
        """Rows of the expert loads: the main MoE layers by index, then the MTP modules' MoE layers."""
        m = self.spec.model
        n_mtp = min(n, m.mtp_depth if m.n_layers > m.n_dense_layers else 0)  # MTP blocks use the MoE unless all are dense
        return [f"layer{i}" for i in range(n - n_mtp)] + [f"mtp{i}" for i in range(n_mtp)]

    def close(self) -> None:
        self.tracker.close()


def heatmap_file(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "expert_load" / f"step-{step:06d}.npy"


def heatmap_media(run_dir: Path):
    """For tracking.MetricsFollower: the W&B heatmap of the steps whose expert loads rank 0 saved."""
    def media(step: int) -> dict:
        path = heatmap_file(run_dir, step)
        return {"moe/expert_load_heatmap": expert_load_heatmap(np.load(path), step)} if path.is_file() else {}
    return media


def expert_load_heatmap(rel: np.ndarray, step: int):
    """A W&B image of the expert loads [MoE layers, routed experts], each row divided by its mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import wandb

    fig, ax = plt.subplots(figsize=(max(4, rel.shape[1] * 0.4), max(2, rel.shape[0] * 0.5)))
    im = ax.imshow(rel, cmap="viridis", aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"expert load / mean, step {step}")
    fig.colorbar(im, ax=ax)
    img = wandb.Image(fig)
    plt.close(fig)
    return img


def _rss() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def report_checkpoint(engine, loader, step: int, rank: int, world: int, metrics: dict, experts=None) -> None:
    """Save this rank's part of the checkpoint after `step` and report it to Ray Train (every rank)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix=f"ckpt-{step}-rank{rank}-") as d:
        state = {"loader": loader.state_dict(), "rng": rng_state(), "step": step}
        save_pretrain_part(engine, Path(d), step=step, rank=rank, world=world, worker_state=state, experts=experts)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
