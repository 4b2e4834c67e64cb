"""`sputnik sft`: supervised fine-tuning of a model on a prompt/completion (or chat) table (issue 22).

The same Ray Train + DeepSpeed workers as pretraining (orchestrator/pretrain_worker.py: ZeRO,
checkpoints, resume with the same `--out`, W&B through the detached follower, the HF export), with
three differences: the model starts from `sft.init` (a pretraining, GRPO or SFT run, or an HF
directory), the batches are packed examples whose prompt tokens carry no loss and whose documents
never attend to one another (data/sft.py), and every `sft.eval_every` steps the held-out split's
loss and next-token accuracy on completion tokens are measured (`eval/loss`,
`eval/token_accuracy`). Everything is checked before any worker starts: a bad table row, a
missing init or tokenizer, a sequence length the model cannot take exit with status 2.

Test: `pytest tests/orchestrator/test_orch_sft.py tests/data/test_data_sft.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from orchestrator.config import ConfigError, RunConfig, to_dict
from orchestrator.signals import as_stopped

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def run(cfg: RunConfig, cli_args) -> int:
    execute(cfg, cli_args.out)
    return 0


def prepare(cfg: RunConfig):
    """(HF init dir, tokenizer path, tokenizer, train examples, held-out examples, seq_len); every
    error a user can cause as a ConfigError naming the key, file or row."""
    from data.sft import SFTDataError, SFTLoader, encode_examples, read_sft_table
    from data.tokenizer import load_tokenizer
    from model.hf import from_hf_config
    from orchestrator.checkpoints import resolve_model_source

    s = cfg.sft
    if not s.data:
        raise ConfigError("key 'sft.data' is required: a .jsonl/.parquet table with prompt and completion columns (or chat messages)")
    hf, tok_path = resolve_model_source(s.init, s.tokenizer, "sft")
    try:
        rows = read_sft_table(s.data)
        tok = load_tokenizer(tok_path)
        args = from_hf_config(json.loads((hf / "config.json").read_text()))
        if tok.vocab_size > args.vocab:
            raise ConfigError(f"key 'sft.tokenizer': {tok_path} has {tok.vocab_size} tokens, more than the model's vocabulary ({args.vocab})")
        seq_len = s.seq_len or cfg.data.seq_len
        if seq_len > args.max_seq_len:
            raise ConfigError(f"key 'sft.seq_len' ({seq_len}) exceeds the model's max_seq_len ({args.max_seq_len})")
        train = encode_examples([r for r in rows if r["split"] == "train"], tok, cfg.data.template)
        heldout = encode_examples([r for r in rows if r["split"] == "heldout"][: s.heldout_size], tok, cfg.data.template)
    except (SFTDataError, FileNotFoundError) as e:
        raise ConfigError(f"key 'sft.data': {e}") from None
    except ValueError as e:  # a tokenizer without EOS (the message names the file)
        raise ConfigError(f"sft: {e}") from None
    try:  # the packed batches (the workers build their own)
        SFTLoader(train, seq_len=seq_len, batch_size=s.micro_batch_size * s.workers, pad_id=tok.pad_id, world_size=s.workers)
    except ValueError as e:  # no train rows, or too few for one batch
        raise ConfigError(f"key 'sft.data' ({s.data}) with sft.micro_batch_size {s.micro_batch_size} x sft.workers {s.workers}: {e}") from None
    return hf, tok_path, tok, args, train, heldout, seq_len


def execute(cfg: RunConfig, out: str | Path | None) -> Path:
    """Fine-tune into `out` (or a new run directory) and return the run directory."""
    from data.sft import save_examples
    from orchestrator.pretrain import check_cluster, check_compile, peak_flops, train_workers
    from orchestrator.pretrain_worker import WorkerSpec
    from orchestrator.rundir import create_run_dir
    from orchestrator.tracking import Tracker, start_follower

    if cfg.sft.warmup_steps >= cfg.sft.steps:
        raise ConfigError(f"key 'sft.warmup_steps' ({cfg.sft.warmup_steps}) must be below sft.steps ({cfg.sft.steps})")
    check_compile(cfg.sft, "sft")
    hf, tok_path, tok, args, train, heldout, seq_len = prepare(cfg)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # the workers' progress lines (see pretrain.execute)
    cfg = dataclasses.replace(cfg, model=args)  # the run's model is the init's: export and resume read it from config.yaml
    run_dir = create_run_dir(cfg, out).resolve()
    print(f"sft: run directory {run_dir}; {len(train)} training and {len(heldout)} held-out examples from {cfg.sft.data}", flush=True)
    tok_dir = run_dir / "tokenizer"  # the run keeps its tokenizer: later commands read it from here
    tok_dir.mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (tok_path.parent / name).is_file() and (name == "tokenizer.json" or not tok.native):
            shutil.copyfile(tok_path if name == "tokenizer.json" else tok_path.parent / name, tok_dir / name)
    data_dir = run_dir / "sft_data"
    data_dir.mkdir(exist_ok=True)
    save_examples(data_dir / "train.parquet", train)
    save_examples(data_dir / "heldout.parquet", heldout)
    s = cfg.sft
    cpus = cfg.cluster.num_cpus or os.cpu_count() or 1
    spec = WorkerSpec(pretrain=s, model=args, tracking=cfg.tracking, seed=cfg.seed, run_name=cfg.name, run_dir=run_dir,
                      shard_dir=data_dir, seq_len=seq_len, bos_id=tok.bos_id, eos_id=tok.eos_id, threads=max(1, cpus // s.workers),
                      peak_flops=peak_flops(), job="sft", init_dir=hf, sft_examples=data_dir / "train.parquet",
                      sft_heldout=data_dir / "heldout.parquet" if heldout else None, pad_id=tok.pad_id, eval_every=s.eval_every)
    follower = start_follower(run_dir, cfg.tracking, name=cfg.name, config=to_dict(cfg), job_type="sft",
                              media="orchestrator.pretrain_worker:heatmap_media")
    try:
        check_cluster(cfg, run_dir, {hf: "sft.init"}, command="sft")
        train_workers(cfg, spec)
        final = export_run(run_dir, args, tok_dir / "tokenizer.json", cfg.data.template)
    except BaseException as e:
        if follower:
            follower.stop()
        if isinstance(e, KeyboardInterrupt):
            raise as_stopped(e) from None
        raise
    summary = summarize(run_dir, final, tok_dir / "tokenizer.json", len(train), len(heldout))
    with Tracker(run_dir, dataclasses.replace(cfg.tracking, wandb_mode="disabled"), name=cfg.name) as tracker:
        tracker.summary(summary)
    write_report(run_dir, summary)
    if follower and not follower.stop(wait_s=120):
        print(f"sft: the W&B run is still being finished (log: {run_dir / 'wandb-follower.log'})", flush=True)
    held = summary.get("heldout_loss")
    print(f"sft: done; final loss {summary['final_loss']:.4f}"
          + (f", held-out loss {held:.4f}, token accuracy {summary['heldout_token_accuracy']:.3f}" if held is not None else "")
          + f"; HF model in {final}", flush=True)
    return run_dir


def export_run(run_dir: Path, args, tokenizer: Path, template: str) -> Path:
    from orchestrator.checkpoints import find_checkpoints
    from orchestrator.export import export_checkpoint

    ckpts = find_checkpoints(run_dir)
    if not ckpts:
        raise RuntimeError(f"{run_dir}: the run left no complete checkpoint to export")
    out = run_dir / "hf"
    export_checkpoint(ckpts[-1], args, out, tokenizer=tokenizer, template=template)
    return out


def summarize(run_dir: Path, final: Path, tokenizer: Path, n_train: int, n_heldout: int) -> dict:
    from orchestrator.report import read_jsonl

    recs = read_jsonl(run_dir / "metrics.jsonl")
    evals = [r for r in recs if "eval/loss" in r]
    out = {"final_loss": recs[-1]["train/loss"] if recs else None, "steps": recs[-1]["step"] if recs else 0,
           "train_examples": n_train, "heldout_examples": n_heldout, "hf_export": str(final), "tokenizer": str(tokenizer)}
    if evals:
        out.update({"heldout_loss": evals[-1]["eval/loss"], "heldout_token_accuracy": evals[-1]["eval/token_accuracy"],
                    "heldout_curve": [[r["step"], r["eval/loss"], r["eval/token_accuracy"]] for r in evals]})
    return out


def write_report(run_dir: Path, summary: dict) -> Path:
    """report.md with the training and held-out loss curves (plots/sft_loss.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from orchestrator.report import read_jsonl

    recs = read_jsonl(run_dir / "metrics.jsonl")
    (run_dir / "plots").mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in recs], [r["train/loss"] for r in recs], label="train loss (completion tokens)")
    curve = summary.get("heldout_curve", [])
    if curve:
        ax.plot([c[0] for c in curve], [c[1] for c in curve], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "plots" / "sft_loss.png", dpi=100)
    plt.close(fig)
    lines = ["# Supervised fine-tuning", "", f"- training examples: {summary['train_examples']}, held-out: {summary['heldout_examples']}",
             f"- steps: {summary['steps']}, final training loss: {summary['final_loss']:.4f}"]
    if curve:
        lines += ["", "| step | held-out loss | held-out token accuracy |", "|---|---|---|"]
        lines += [f"| {s} | {lo:.4f} | {acc:.3f} |" for s, lo, acc in curve]
    lines += ["", "![loss](plots/sft_loss.png)", "", f"HF model: `{summary['hf_export']}`", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


@torch.no_grad()
def heldout_metrics(model, heldout: list[tuple[list[int], int]], spec, device, rank: int, world: int) -> dict[str, float]:
    """{"eval/loss", "eval/token_accuracy"} over the held-out examples' completion tokens, each
    example alone in its positions (packed in a fixed order). Every rank runs the same number of
    forwards (ZeRO-3 gathers weights in each); the sums are reduced over ranks."""
    import torch.distributed as dist

    from data.sft import IGNORE, build_row, doc_mask, pack_rows

    rows = pack_rows(heldout, list(range(len(heldout))), spec.seq_len)
    mb = spec.pretrain.micro_batch_size
    per_rank = -(-len(rows) // world)
    mine = rows[rank::world]
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, tokens
    for lo in range(0, -(-per_rank // mb) * mb, mb):
        chunk = mine[lo : lo + mb]
        real = len(chunk)
        chunk = chunk + [rows[0]] * (mb - len(chunk))  # the same forwards on every rank; extras do not count
        built = [build_row(heldout, r, spec.seq_len, spec.pad_id) for r in chunk]
        b = {k: torch.stack([x[k] for x in built]).to(device) for k in built[0]}
        logits = model(b["tokens"], positions_BT=b["positions"], mask_BTS=doc_mask(b["doc"])).float()[:real]
        tgt = b["targets"][:real]
        keep = tgt != IGNORE
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt.clamp(min=0), reduction="none")
        sums += torch.tensor([float(ce[keep].sum()), float((logits.argmax(-1) == tgt)[keep].sum()), float(keep.sum())], dtype=torch.float64)
    model.train(was_training)
    if world > 1:
        t = sums.to(device)
        dist.all_reduce(t)
        sums = t.cpu()
    n = max(float(sums[2]), 1.0)
    return {"eval/loss": float(sums[0]) / n, "eval/token_accuracy": float(sums[1]) / n}
