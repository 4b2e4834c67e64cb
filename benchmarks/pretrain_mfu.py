"""Single-device training throughput and MFU of a model preset (default `small`), bf16 autocast.

Plain torch training step (AdamW, the model's MoE + MTP loss), the same model code the DeepSpeed
workers run; MFU = 6 * activated parameters * tokens/s / peak, against the datasheet bf16 peak
and against a large bf16 matmul measured in the same run. On CPU it says so and runs a tiny check.

Run: `python benchmarks/pretrain_mfu.py [--preset small] [--batch 8] [--seq 1024] [--steps 20]`.
"""

from __future__ import annotations

import argparse
import time

import torch

from model import Transformer, load_model_args
from model.parallel import apply_activation_checkpointing

DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def measured_matmul_peak(n: int = 8192, iters: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ac", action="store_true", help="activation checkpointing")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: MFU needs one; running 2 steps of the tiny preset on CPU as a smoke check")
        a.preset, a.batch, a.seq, a.steps = "tiny", 2, 64, 2
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    args = load_model_args(a.preset, max_seq_len=max(a.seq, 128))
    model = Transformer(args).to(dev)
    if a.ac:
        apply_activation_checkpointing(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev == "cuda")
    tokens = torch.randint(0, args.vocab, (a.batch, a.seq + 1), device=dev)

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss, _ = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3 if dev == "cuda" else 1):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    if dev == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / a.steps
    tps = a.batch * a.seq / dt
    flops = 6 * model.num_parameters(activated=True) * tps
    print(f"preset {a.preset}: {model.num_parameters() / 1e6:.0f}M total, {model.num_parameters(activated=True) / 1e6:.0f}M activated; batch {a.batch} x {a.seq}; loss {loss.item():.3f}")
    print(f"step {dt * 1e3:.1f} ms, {tps:,.0f} tokens/s, model FLOP/s {flops / 1e12:.1f} T")
    if dev == "cuda":
        name = torch.cuda.get_device_name()
        peak = measured_matmul_peak()
        sheet = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
        print(f"device {name}; measured bf16 matmul {peak / 1e12:.0f} TFLOP/s; peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        print(f"MFU vs measured matmul: {flops / peak:.1%}" + (f"; vs datasheet {sheet / 1e12:.0f}: {flops / sheet:.1%}" if sheet else ""))


if __name__ == "__main__":
    main()
