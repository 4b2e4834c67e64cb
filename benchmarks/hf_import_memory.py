"""Peak memory of importing a Hugging Face DeepseekV3 checkpoint (issue 19): `model.hf.from_hf_pretrained`
(lazy per-tensor reads, one shard open at a time) vs the eager baseline (every shard read into
memory with safetensors.torch.load_file, then copied into the model: what the importer did before).

A ~190M-parameter model (fp32 in memory, ~0.76 GB) is written as a sharded checkpoint twice: bf16
and FP8 e4m3 + 128x128 block scales (DeepSeek's layout), shards of --shard-mb. Each load runs in a
fresh process; it reports the peak RSS (ru_maxrss) above the RSS it had before loading, divided by
the bytes of the loaded model's parameters and buffers. Issue 19's target: below 1.5x.

Run: `python benchmarks/hf_import_memory.py [--shard-mb 100]`.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARGS = dict(vocab=32000, dim=1024, inter_dim=2816, moe_inter_dim=512, n_layers=4, n_dense_layers=1, n_heads=8,
            q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
            n_routed_experts=16, n_shared_experts=1, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1,
            max_seq_len=1024, mtp_depth=1)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(mode: str, path: str) -> None:
    """Load in this (fresh) process and print {"peak_mb", "model_mb", "seconds"} as JSON."""
    import torch  # noqa: F401  (imported before the baseline RSS is taken)

    from model.hf import from_hf_pretrained

    if mode == "eager":
        from safetensors.torch import load_file

        from model.hf.load import _fp8_block, dequantize_fp8
        from model.hf.config import SCALE_SUFFIX, from_hf_config, key_map
        from model.transformer import Transformer

    base = rss_mb()
    t0 = time.perf_counter()
    if mode == "lazy":
        model = from_hf_pretrained(path)
    else:  # the importer before issue 19: every tensor of every shard in memory, then copied in
        cfg = json.loads((Path(path) / "config.json").read_text())
        tensors = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            tensors.update(load_file(str(f)))
        model = Transformer(from_hf_config(cfg))
        sd = model.state_dict()
        with torch.no_grad():
            for hf, (ours, transpose) in key_map(model).items():
                t = tensors[hf]
                if t.dtype == torch.float8_e4m3fn:
                    t = dequantize_fp8(t, tensors[hf + SCALE_SUFFIX], _fp8_block(cfg))
                name, _, e = ours.partition("#")
                (sd[name][int(e)] if e else sd[name]).copy_(t.t() if transpose else t)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    print(json.dumps({"peak_mb": peak - base, "model_mb": model_mb, "seconds": seconds}))


def measure(mode: str, path: Path) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], cwd=REPO, capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu"})
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shard-mb", type=int, default=100)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    import torch

    from model import ModelArgs, Transformer
    from model.hf import save_hf_pretrained

    torch.manual_seed(0)
    model = Transformer(ModelArgs(**ARGS))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, Python {platform.python_version()}; "
          f"model {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
    with tempfile.TemporaryDirectory() as tmp:
        for label, kw in [("bf16", dict(dtype=torch.bfloat16)), ("fp8", dict(dtype=torch.bfloat16, fp8=True))]:
            path = Path(tmp) / label
            save_hf_pretrained(model, path, max_shard_size=f"{a.shard_mb}MB", **kw)
            ckpt_mb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
            n = len(list(path.glob("*.safetensors")))
            lazy, eager = measure("lazy", path), measure("eager", path)
            print(f"{label}: checkpoint {ckpt_mb:.0f} MB in {n} files; model {lazy['model_mb']:.0f} MB fp32")
            print(f"  from_hf_pretrained  peak {lazy['peak_mb']:.0f} MB = {lazy['peak_mb'] / lazy['model_mb']:.2f}x model  ({lazy['seconds']:.1f} s)")
            print(f"  eager baseline      peak {eager['peak_mb']:.0f} MB = {eager['peak_mb'] / eager['model_mb']:.2f}x model  ({eager['seconds']:.1f} s)")
            print(f"  ratio lazy/eager peak: {lazy['peak_mb'] / eager['peak_mb']:.2f}")
        del model


if __name__ == "__main__":
    main()
