"""Single-device training throughput and MFU of a model preset (default `small`), bf16 autocast.

Plain torch training step (AdamW, the model's MoE + MTP loss), the same model code the DeepSpeed
workers run; MFU = 6 * activated parameters * tokens/s / peak, against the datasheet bf16 peak
and against a large bf16 matmul measured in the same run. On CPU it says so and runs a tiny check.

Run: `python benchmarks/pretrain_mfu.py [--preset small] [--batch 8] [--seq 1024] [--steps 20] [--fp8] [--profile N]`;
with --fp8 the same step also runs with DeepSeek-V3's FP8 linears and experts (model/fp8.py) and the
ratio of the two is printed; --profile N prints, per run, the N ops with the most self device time
over 2 profiled steps (where the step's time goes, for the next optimisation).
"""

from __future__ import annotations

import argparse
import time

import torch

from model import Transformer, load_model_args
from model.fp8 import apply_fp8
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
    ap.add_argument("--fp8", action="store_true", help="also run with the FP8 linears and experts, and print the ratio")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile 2 steps and print the N ops taking the most device (or CPU) time")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: MFU needs one; running 2 steps of the tiny preset on CPU as a smoke check")
        a.preset, a.batch, a.seq, a.steps = "tiny", 2, 64, 2
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base = "bf16" if dev == "cuda" else "fp32"  # bf16 autocast on GPUs; CPU runs fp32
    runs = {kind: measure(a, dev, kind) for kind in ([base, "fp8"] if a.fp8 else [base])}
    peak = sheet = None
    if dev == "cuda":
        name = torch.cuda.get_device_name()
        peak = measured_matmul_peak()
        sheet = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
        print(f"device {name}, torch {torch.__version__}; measured bf16 matmul {peak / 1e12:.0f} TFLOP/s")
    for kind, (model, dt, tps, loss, mem) in runs.items():
        flops = 6 * model.num_parameters(activated=True) * tps
        print(f"[{kind}] preset {a.preset}: {model.num_parameters() / 1e6:.0f}M total, {model.num_parameters(activated=True) / 1e6:.0f}M activated; "
              f"batch {a.batch} x {a.seq}; loss {loss:.3f}; step {dt * 1e3:.1f} ms, {tps:,.0f} tokens/s, model FLOP/s {flops / 1e12:.1f} T"
              + (f", peak memory {mem:.1f} GiB" if dev == "cuda" else ""))
        if peak:
            print(f"[{kind}] MFU vs measured bf16 matmul: {flops / peak:.1%}" + (f"; vs datasheet {sheet / 1e12:.0f}: {flops / sheet:.1%}" if sheet else ""))
    if a.fp8:
        print(f"fp8 / {base} tokens/s: {runs['fp8'][2] / runs[base][2]:.2f}x" + (" (MFU of both counted against the bf16 peak)" if dev == "cuda" else
              " (FP8 is emulated on CPU: a smoke check, not a speed figure)"))


def measure(a, dev: str, kind: str):
    """Build the preset, train a.steps steps (kind "fp8": with FP8 linears and experts); (model,
    seconds per step, tokens/s, loss, peak GiB)."""
    torch.manual_seed(0)
    args = load_model_args(a.preset, max_seq_len=max(a.seq, 128))
    model = Transformer(args).to(dev)
    if kind == "fp8":  # DeepSeek-V3 FP8 linears and experts (Triton on Hopper/Ada, emulated elsewhere)
        apply_fp8(model)
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
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
    if a.profile:
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(2):
                step()
            if dev == "cuda":
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
        print(f"[{kind}] top {a.profile} ops by {key} over 2 steps:")
        print(prof.key_averages().table(sort_by=key, row_limit=a.profile, max_name_column_width=60))
    return model, dt, a.batch * a.seq / dt, loss.item(), mem


if __name__ == "__main__":
    main()
