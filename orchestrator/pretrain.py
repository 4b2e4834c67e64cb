"""`sputnik pretrain`: Ray Train TorchTrainer with N DeepSpeed workers over the MoE model.

Steps: validate the config against the cluster (before any worker starts; an impossible placement
on a fixed-size cluster fails at once), prepare or reuse the tokenizer and shards, run the workers
(orchestrator/pretrain_worker.py) with a FailureConfig so a lost worker restarts everything from
the last complete checkpoint, then export the final model as a Hugging Face directory in the run
directory. Re-running with the same `--out` resumes from the latest checkpoint there (Ray Train
restores the run from its storage folder). The W&B run belongs to a detached follower of the
workers' metrics.jsonl (tracking.start_follower), so `ray job stop` loses no logged step.

Test: `pytest tests/orchestrator/test_orch_pretrain.py tests/orchestrator/test_orch_stop.py`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch

from model import ModelArgs
from orchestrator.config import ConfigError, RunConfig, to_dict
from orchestrator.rundir import create_run_dir
from orchestrator.signals import as_stopped

CACHE_ENV = "SPUTNIK_CACHE"
# Datasheet bf16 dense peaks used for MFU (FLOP/s per device); unknown devices report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def cache_root() -> Path:
    """The corpus cache: $SPUTNIK_CACHE, else ~/.cache/sputnik (never relative to the working
    directory, which under `ray job submit --working-dir` is a temporary copy Ray deletes)."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sputnik"
    return Path(os.environ.get(CACHE_ENV) or default).resolve()


def validate(cfg: RunConfig) -> None:
    """Errors a user can cause, reported before any worker starts."""
    p, m = cfg.pretrain, cfg.model
    assert isinstance(m, ModelArgs)
    if p.expert_parallel > 1:
        if p.workers % p.expert_parallel:
            raise ConfigError(f"key 'pretrain.expert_parallel' ({p.expert_parallel}) must divide pretrain.workers ({p.workers})")
        if m.n_routed_experts % p.expert_parallel:
            raise ConfigError(f"key 'pretrain.expert_parallel' ({p.expert_parallel}) must divide model.n_routed_experts ({m.n_routed_experts})")
    check_compile(p, "pretrain")
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(f"key 'data.seq_len' ({cfg.data.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    if p.warmup_steps >= p.steps:
        raise ConfigError(f"key 'pretrain.warmup_steps' ({p.warmup_steps}) must be below pretrain.steps ({p.steps})")


def check_compile(p, section: str) -> None:
    """`compile` needs one graph: no ZeRO-3 gathering hooks, all-to-all with host-side counts, FP8's
    emulated GEMMs or the checkpointed blocks' recompute bookkeeping inside it."""
    if p.compile and (p.zero_stage == 3 or p.expert_parallel > 1 or p.fp8 or p.activation_checkpointing):
        raise ConfigError(f"key '{section}.compile' compiles the training step as one graph: not with {section}.zero_stage=3, "
                          f"{section}.expert_parallel > 1, {section}.fp8 or {section}.activation_checkpointing")


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def run(cfg: RunConfig, cli_args) -> int:
    execute(cfg, cli_args.out)
    return 0


def execute(cfg: RunConfig, out: str | Path | None) -> Path:
    """Pretrain into `out` (or a new run directory) and return the run directory."""
    validate(cfg)
    # The workers' progress lines differ only in their numbers: Ray's log deduplication (read when
    # ray is first imported, below) would fold them into "[repeated Nx across cluster]".
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_dir = create_run_dir(cfg, out).resolve()
    print(f"pretrain: run directory {run_dir}", flush=True)
    from data.prepare import prepare_corpus
    from data.tokenizer import load_tokenizer

    try:
        corpus = prepare_corpus(cfg.data, cache_root())
    except (FileNotFoundError, ValueError) as e:  # bad user files: one line naming the file
        raise ConfigError(str(e)) from None
    # the run keeps its own copy of the tokenizer: later commands read it from the run directory
    tok_path = run_dir / "tokenizer.json"
    shutil.copyfile(corpus.tokenizer_path, tok_path)
    tok = load_tokenizer(tok_path)
    if tok.vocab_size > cfg.model.vocab:
        raise ConfigError(f"key 'model.vocab' ({cfg.model.vocab}) is smaller than the tokenizer's vocabulary ({tok.vocab_size})")
    from orchestrator.tracking import Tracker, start_follower

    # The W&B run belongs to a follower of the workers' metrics.jsonl in a process of its own:
    # `ray job stop` (SIGTERM to this process and its descendants) cannot cut it short, and it
    # finishes the run with every record written once this process is gone.
    follower = start_follower(run_dir, cfg.tracking, name=cfg.name, config=to_dict(cfg), job_type="pretrain",
                              media="orchestrator.pretrain_worker:heatmap_media")
    try:
        result = fit(cfg, run_dir, corpus.shard_dir, tok)
        final = export_latest(run_dir, cfg.model)
    except BaseException as e:  # the follower finishes the W&B run with what was logged
        if follower:
            follower.stop()
        if isinstance(e, KeyboardInterrupt):  # Ray Train re-raises a plain one: say whether it was SIGTERM
            raise as_stopped(e) from None
        raise
    figures = {"final_loss": result.metrics.get("loss") if result.metrics else None, "steps": cfg.pretrain.steps,
               "hf_export": str(final), "tokenizer": str(tok_path), "corpus_cache": str(corpus.shard_dir)}
    with Tracker(run_dir, dataclasses.replace(cfg.tracking, wandb_mode="disabled"), name=cfg.name) as tracker:
        tracker.summary(figures)
    if follower and not follower.stop(wait_s=120):
        print(f"pretrain: the W&B run is still being finished (log: {run_dir / 'wandb-follower.log'})", flush=True)
    print(f"pretrain: done; final loss {figures['final_loss']}; HF model in {final}", flush=True)
    return run_dir


def fit(cfg: RunConfig, run_dir: Path, shard_dir: Path, tok):
    from orchestrator.pretrain_worker import WorkerSpec

    check_cluster(cfg, run_dir, {shard_dir: f"the corpus cache ({CACHE_ENV})"})  # before anything else: a bad plan fails now
    p = cfg.pretrain
    cpus = cfg.cluster.num_cpus or os.cpu_count() or 1
    spec = WorkerSpec(
        pretrain=p, model=cfg.model, tracking=cfg.tracking, seed=cfg.seed, run_name=cfg.name, run_dir=run_dir,
        shard_dir=Path(shard_dir), seq_len=cfg.data.seq_len, bos_id=tok.bos_id, eos_id=tok.eos_id,
        threads=max(1, cpus // p.workers), peak_flops=peak_flops(),
    )
    return train_workers(cfg, spec)


def check_cluster(cfg: RunConfig, run_dir: Path, shared: dict[Path, str], command: str = "pretrain") -> None:
    """Start or join Ray; refuse an impossible placement of the workers and storage that not every
    node sees (`shared`: directories every node must see, by the key that set them)."""
    import ray

    from orchestrator.placement import check_placement, check_shared_storage, cluster_gpus, roles_for
    from orchestrator.ray_local import init_ray

    init_ray(cfg.cluster)
    # the workers' bundles as `sputnik plan` places them: an impossible plan fails now, with the reason
    check_placement(ray, cfg.cluster, roles_for(cfg, command, cluster_gpus(ray)))
    if cfg.cluster.storage_path:
        check_shared_storage(ray, str(cfg.cluster.storage_path), key="cluster.storage_path")
    check_shared_storage(ray, run_dir, key="--out")  # metrics, checkpoints, the HF export
    for path, key in shared.items():
        check_shared_storage(ray, path, key=key)


def train_workers(cfg: RunConfig, spec):
    """Ray Train over `spec.pretrain.workers` workers running pretrain_worker.train_loop (pretraining
    and SFT), after check_cluster."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator.placement import cluster_gpus
    from orchestrator.pretrain_worker import train_loop

    run_dir, p = spec.run_dir, spec.pretrain
    storage = str(cfg.cluster.storage_path or run_dir / "checkpoints")
    use_gpu = (cfg.cluster.gpus_per_learner if cfg.cluster.gpus_per_learner is not None else cluster_gpus(ray)) > 0
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec},  # Ray Train hands the workers a dict
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=p.workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.cluster.cpus_per_learner, **({"GPU": cfg.cluster.gpus_per_learner or 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=p.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=p.keep_checkpoints),
        ),
    )
    return trainer.fit()


def export_latest(run_dir: Path, args: ModelArgs) -> Path:
    """Export the run's latest checkpoint, with the tokenizer of its corpus, to `run_dir/hf`."""
    from orchestrator.checkpoints import find_checkpoints, find_tokenizer
    from orchestrator.config import load_config
    from orchestrator.export import export_checkpoint

    ckpts = find_checkpoints(run_dir)
    if not ckpts:
        raise RuntimeError(f"{run_dir}: the run left no complete checkpoint to export")
    out = run_dir / "hf"
    template = load_config(run_dir / "config.yaml").data.template
    export_checkpoint(ckpts[-1], args, out, tokenizer=find_tokenizer(run_dir), template=template)
    return out
