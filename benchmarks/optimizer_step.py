"""AdamW's step on one flat fp32 partition (what ZeRO 1-3 hand torch's AdamW), unfused against fused
(ds_config.adamw_params), in one run: seconds per step and, on CUDA, the step's extra memory.

Unfused is what DeepSpeed gave torch's AdamW before: the single-tensor loop on CPU, foreach on
CUDA (torch's default there); both make fp32 temporaries the size of the partition. Fused is one
pass per tensor with no temporaries.

Run: `python benchmarks/optimizer_step.py [--numel N] [--threads 1] [--steps 3]` (CPU or CUDA; by
default 279M elements on CPU, the small preset's parameter count, one rank's partition under ZeRO
with one rank, and 1B on CUDA).
"""

from __future__ import annotations

import argparse
import time

import torch


def step_seconds(numel: int, fused: bool, steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds per step after the first, peak bytes above the state's on CUDA, else nan)."""
    p = torch.zeros(numel, device=device, requires_grad=True)
    p.grad = torch.randn(numel, device=device) * 1e-3
    kw = {"fused": True} if fused else {"foreach": device.type == "cuda"}
    opt = torch.optim.AdamW([p], lr=1e-3, **kw)
    opt.step()  # the moments are made here
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    extra = float(torch.cuda.max_memory_allocated() - base) if cuda else float("nan")
    return seconds, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=None, help="elements (default: 279M on CPU, 1B on CUDA)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    a.numel = a.numel or (1_000_000_000 if device.type == "cuda" else 279_000_000)
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"AdamW step on one flat fp32 tensor of {a.numel:,} elements, {where}")
    unfused, extra_u = step_seconds(a.numel, False, a.steps, device)
    fused, extra_f = step_seconds(a.numel, True, a.steps, device)
    name = "foreach" if device.type == "cuda" else "single-tensor"
    print(f"unfused ({name}): {unfused:.3f} s/step" + (f", {extra_u / 2**30:.2f} GiB extra" if device.type == "cuda" else ""))
    print(f"fused:             {fused:.3f} s/step" + (f", {extra_f / 2**30:.2f} GiB extra" if device.type == "cuda" else ""))
    print(f"fused / unfused time: {fused / unfused:.3f}")


if __name__ == "__main__":
    main()
