"""One pretraining worker: a DeepSpeed engine over the MoE model, fed by the packing loader.

`train_loop(config)` is what Ray Train runs on every worker (it also runs without Ray on a GPU box,
given a `Reporter`). Each optimizer step: grad-accumulated micro-batches, DeepSpeed step (ZeRO,
clipping, warmup + cosine LR), then the auxiliary-loss-free bias update with expert loads summed
over all ranks. Checkpoints: DeepSpeed `save_checkpoint` on every rank plus each rank's loader
and RNG state, reported through `ray.train.report(checkpoint=...)`; a checkpoint counts only once
Ray has registered it from all workers, and `meta.json` (written last by rank 0) marks it complete.

Test: `pytest tests/orchestrator/test_orch_pretrain.py`.
"""

from __future__ import annotations

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
from orchestrator.config import PretrainConfig, TrackingConfig
from orchestrator.ds_config import deepspeed_config, import_deepspeed, lr_lambda

DS_TAG = "ds"


class LossModule(nn.Module):
    """What the DeepSpeed engine wraps: forward(tokens, targets) -> (loss, metrics)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens, targets):
        return self.model.loss(tokens, targets)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def expert_load_heatmap(loads, step: int):
    """A W&B image of the (layers x experts) load, each row divided by its mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import wandb

    rel = (loads / loads.mean(dim=1, keepdim=True).clamp(min=1e-9)).numpy()
    fig, ax = plt.subplots(figsize=(max(4, rel.shape[1] * 0.4), max(2, rel.shape[0] * 0.5)))
    im = ax.imshow(rel, cmap="viridis", aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"expert load / mean, step {step}")
    fig.colorbar(im, ax=ax)
    img = wandb.Image(fig)
    plt.close(fig)
    return img


def train_loop(config: dict) -> None:
    import ray.train

    deepspeed = import_deepspeed()

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    pcfg: PretrainConfig = config["pretrain"]
    args: ModelArgs = config["model"]
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    bf16 = pcfg.precision == "bf16" or (pcfg.precision == "auto" and on_gpu)

    torch.manual_seed(config["seed"])  # identical initial weights on every rank
    model = Transformer(args)
    if pcfg.fp8:  # DeepSeek-V3 FP8 linears; parameters stay the master weights (model/fp8.py)
        from model.fp8 import apply_fp8

        converted = apply_fp8(model)
        if rank == 0:
            print(f"pretrain: FP8 block-scaled GEMMs in {len(converted)} modules ({'Triton' if on_gpu else 'emulated on CPU'})", flush=True)
    if pcfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if pcfg.expert_parallel > 1:
        # consecutive ranks form an expert-parallel group; the weights stay whole (and identical on
        # every rank), so DeepSpeed's data-parallel average is the exact global-batch gradient
        ep = pcfg.expert_parallel
        groups = [dist.new_group(list(range(s, s + ep))) for s in range(0, world, ep)]  # every rank creates every group
        apply_expert_parallel(model, groups[rank // ep], shard_weights=False)
        if rank == 0:
            print(f"pretrain: expert parallel {ep}: each worker computes {args.n_routed_experts // ep} of {args.n_routed_experts} routed experts per MoE layer", flush=True)
    total_steps = pcfg.steps
    flops_per_token = 6 * model.num_parameters(activated=True)  # before ZeRO-3 partitions the weights
    ds_cfg = deepspeed_config(
        micro_batch_size=pcfg.micro_batch_size, grad_accum=pcfg.grad_accum, world_size=world,
        zero_stage=pcfg.zero_stage, lr=pcfg.lr, betas=pcfg.betas, weight_decay=pcfg.weight_decay,
        grad_clip=pcfg.grad_clip, bf16=bf16, offload_optimizer=pcfg.offload_optimizer,
    )

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_lambda(s, warmup_steps=pcfg.warmup_steps, total_steps=total_steps, min_lr_ratio=pcfg.min_lr_ratio)
        )

    engine, _, _, scheduler = deepspeed.initialize(model=LossModule(model), model_parameters=model.parameters(), config=ds_cfg, lr_scheduler=schedule)

    from data.loader import PackedLoader

    loader = PackedLoader(
        config["shard_dir"], seq_len=config["seq_len"], batch_size=pcfg.micro_batch_size * world,
        bos_id=config["bos_id"], eos_id=config["eos_id"], seed=config["seed"], rank=rank, world_size=world,
    )
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            meta = json.loads((Path(d) / "meta.json").read_text())
            if meta["world_size"] != world:
                raise RuntimeError(f"checkpoint {d} was written by {meta['world_size']} workers, not {world}: resuming on another world size is not supported")
            engine.load_checkpoint(d, tag=DS_TAG)
            state = torch.load(Path(d) / f"rank{rank}.pt", weights_only=False)
            loader.load_state_dict(state["loader"])
            set_rng_state(state["rng"])
            start_step = meta["step"]
        if rank == 0:
            print(f"pretrain: resumed from step {start_step}", flush=True)

    tracker = None
    if rank == 0:
        from orchestrator.tracking import Tracker

        tcfg: TrackingConfig = config["tracking"]
        tracker = Tracker(Path(config["run_dir"]), tcfg, name=config["name"], config=config["config_dict"], job_type="pretrain")
    peak = config.get("peak_flops")
    tokens_per_step = pcfg.micro_batch_size * pcfg.grad_accum * world * config["seq_len"]
    last_step = min(total_steps, pcfg.stop_after or total_steps)
    for step in range(start_step + 1, last_step + 1):
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        for _ in range(pcfg.grad_accum):
            batch = next(loader)
            loss, metrics = engine(batch["tokens"].to(device), batch["targets"].to(device))
            engine.backward(loss)
            engine.step()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v / pcfg.grad_accum
        # auxiliary-loss-free balancing: loads over the whole data-parallel group
        loads = model.expert_loads().to(device)
        if world > 1:
            dist.all_reduce(loads)
        model.update_expert_bias(loads)
        dt = time.perf_counter() - t0
        avg = torch.tensor([sums.get("loss", 0.0), sums.get("ce_loss", 0.0), sums.get("mtp_loss", 0.0)], device=device)
        if world > 1:
            dist.all_reduce(avg)
            avg /= world
        if tracker is not None:
            rel = loads.float().cpu() / loads.float().cpu().mean(dim=1, keepdim=True).clamp(min=1e-9)
            rec = {
                "loss": avg[0].item(), "ce_loss": avg[1].item(), "mtp_loss": avg[2].item(),
                "lr": scheduler.get_last_lr()[0], "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "tokens_per_s": tokens_per_step / dt, "step_time_s": dt,
                "memory_gb": (torch.cuda.max_memory_allocated() if on_gpu else _rss()) / 1e9,
            }
            if peak:
                rec["mfu"] = flops_per_token * tokens_per_step / dt / (peak * world)
            for i, (r, b) in enumerate(zip(rel, model.expert_bias().cpu())):
                rec[f"expert_load_max/layer{i}"] = r.max().item()
                rec[f"expert_load_min/layer{i}"] = r.min().item()
                rec[f"expert_bias_norm/layer{i}"] = b.norm().item()
            if step % config["heatmap_every"] == 0 or step == total_steps:
                rec["expert_load_heatmap"] = expert_load_heatmap(loads.float().cpu(), step) if tracker.wandb_run else None
                np.save(Path(config["run_dir"]) / "expert_load.npy", loads.float().cpu().numpy())
            tracker.log({k: v for k, v in rec.items() if v is not None}, step=step)
            if step % 10 == 0 or step == total_steps:
                print(f"pretrain: step {step}/{total_steps} loss {rec['loss']:.4f} lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tok/s", flush=True)
        if step % pcfg.checkpoint_every == 0 or step == last_step:
            report_checkpoint(engine, loader, step, rank, world, {"loss": avg[0].item(), "step": step})
    if tracker is not None:
        tracker.close()


def _rss() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def report_checkpoint(engine, loader, step: int, rank: int, world: int, metrics: dict) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix=f"ckpt-{step}-rank{rank}-") as d:
        engine.save_checkpoint(d, tag=DS_TAG)
        torch.save({"loader": loader.state_dict(), "rng": rng_state(), "step": step}, Path(d) / f"rank{rank}.pt")
        if rank == 0:  # written last: its presence marks this rank's part complete
            (Path(d) / "meta.json").write_text(json.dumps({"step": step, "world_size": world, "tag": DS_TAG}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
