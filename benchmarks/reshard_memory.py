"""Memory of reading a DeepSpeed checkpoint's full state for a resharded resume (orchestrator/reshard.py).

A resume at another world size, ZeRO stage or expert layout needs every parameter's full fp32 weight
and AdamW moments, assembled from every saved rank's partitions. `read_full_state` memory-maps the
files and assembles one parameter when it is asked for (what `load_resharded` does: set it, drop
it); the baseline, measured in the same run, holds every parameter's full state at once (what the
reader did before, and what a naive merge does). Each variant runs in a fresh process and reports the
peak of its anonymous memory (RssAnon, the process's own pages, sampled every millisecond) above
where it started, and the peak RSS (VmHWM, file pages read through the mapping included: those
are the kernel's page cache, reclaimable), against the model's full state (12 bytes per parameter).

`--export` measures `sputnik export`'s reading the same way (orchestrator/export.py): the checkpoint
written as HF safetensors in 100 MB shards, one tensor read as its shard is written, against the
baseline of the whole model loaded first (what export did before).

Run: `python benchmarks/reshard_memory.py [--preset small] [--stage 2] [--export]` (DS_ACCELERATOR=cpu on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB: RssAnon (the process's own pages), VmHWM (peak RSS of this
    process image; ru_maxrss would carry the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def save(out: str, preset: str, stage: int) -> int:
    """A checkpoint of `preset` after one optimizer step (moments non-zero) at 1 rank, ZeRO `stage`."""
    import torch

    from model import Transformer, load_model_args
    from orchestrator.config import PretrainConfig
    from orchestrator.dist_local import free_port, join_local_group
    from orchestrator.pretrain_worker import build_engine, train_step

    join_local_group(0, 1, free_port())
    torch.manual_seed(0)
    model = Transformer(load_model_args(preset, vocab=512))
    n = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    engine, _ = build_engine(model, PretrainConfig(micro_batch_size=2, zero_stage=stage, steps=2, warmup_steps=1), 1, bf16=False)

    class Rows:
        def __next__(self):
            t = torch.randint(0, 512, (2, 17))
            return {"tokens": t[:, :-1], "targets": t[:, 1:]}

    train_step(engine, model, Rows(), 1, torch.device("cpu"), 1)
    engine.save_checkpoint(out, tag="ds")
    return n


def export(ckpt: str, whole: bool, preset: str) -> int:
    """The checkpoint as an HF directory in 100 MB shards: read as written, or the whole model loaded first."""
    from model import Transformer, load_model_args
    from model.hf import save_hf_pretrained
    from orchestrator.checkpoints import Checkpoint, load_model_state
    from orchestrator.export import export_checkpoint

    ck, args, out = Checkpoint(0, "pretrain", Path(ckpt), "ds"), load_model_args(preset, vocab=512), Path(ckpt) / f"hf-{whole}"
    if whole:
        model = Transformer(args)
        model.load_state_dict(load_model_state(ck), strict=False)
        save_hf_pretrained(model, out, max_shard_size="100MB")
    else:
        export_checkpoint(ck, args, out, max_shard_size="100MB")
    return sum(f.stat().st_size for f in out.glob("*.safetensors")) // 4


def read(ckpt: str, whole: bool, preset: str | None = None) -> dict:
    """Every parameter's full state: one at a time (dropped after), or all held (`whole`); with
    `preset`, the checkpoint exported instead."""
    from orchestrator.reshard import read_full_state

    peak, start, done = [0], status_kb("RssAnon"), threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], status_kb("RssAnon"))
            time.sleep(0.001)

    rss0 = status_kb("VmRSS")
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    held, elements = [], 0
    if preset:
        elements = export(ckpt, whole, preset)
    else:
        full, _, _ = read_full_state(Path(ckpt) / "ds")
        for name, state in full.items():
            s = state()
            elements += sum(v.numel() for v in s.values())
            if whole:
                held.append(s)
    seconds = time.perf_counter() - t0
    peak[0] = max(peak[0], status_kb("RssAnon"))
    done.set()
    t.join()
    return {"anon_mb": (peak[0] - start) / 1024, "maxrss_mb": (status_kb("VmHWM") - rss0) / 1024,
            "seconds": seconds, "elements": elements}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--stage", type=int, default=2, choices=(1, 2, 3), help="ZeRO stage of the saved checkpoint")
    ap.add_argument("--export", action="store_true", help="measure `sputnik export` instead of a resharded resume's reading")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(read(a.child[0], a.child[1] == "whole", a.preset if a.export else None)))
        return
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as d:
        n = save(d, a.preset, a.stage)
        res = {}
        for variant in ("whole", "lazy"):
            p = subprocess.run([sys.executable, __file__, "--child", d, variant, "--preset", a.preset, *(["--export"] if a.export else [])],
                               env=env, capture_output=True, text=True, check=True)
            res[variant] = json.loads(p.stdout.strip().splitlines()[-1])
    full_mb = (4 if a.export else 12) * n / 2**20
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; preset {a.preset} (vocab 512), {n / 1e6:.1f}M parameters, "
          f"ZeRO-{a.stage} checkpoint at 1 rank; " + (f"fp32 weights {full_mb:.0f} MiB, exported in 100 MB shards" if a.export
                                                      else f"full state (fp32 weight + 2 moments) {full_mb:.0f} MiB"))
    print("| reader | anonymous memory peak (MiB) | / full state | peak RSS incl. mapped file pages (MiB) | seconds |")
    print("|---|---|---|---|---|")
    labels = ((("whole", "export: the whole model loaded first (baseline)"), ("lazy", "export: each tensor read as written")) if a.export
              else (("whole", "all parameters held (baseline)"), ("lazy", "one parameter at a time (read_full_state)")))
    for variant, label in labels:
        r = res[variant]
        # export: both wrote the same bytes (MTP's copies of the embedding and head included)
        assert r["elements"] == (res["whole"]["elements"] if a.export else 3 * n), (r["elements"], n)
        print(f"| {label} | {r['anon_mb']:.0f} | {r['anon_mb'] / full_mb:.2f}x | {r['maxrss_mb']:.0f} | {r['seconds']:.2f} |")
    print(f"one at a time / all held, anonymous peak: {res['lazy']['anon_mb'] / res['whole']['anon_mb']:.3f}x")


if __name__ == "__main__":
    main()
