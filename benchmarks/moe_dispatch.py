"""Routed-expert MLP, forward + backward tokens/s: the layer composed from sputnik_kernels/moe.py
(routing_metadata -> permute -> grouped_mm(w1), grouped_mm(w3) -> swiglu -> grouped_mm(w2) ->
unpermute) against a Python loop over experts (mask each expert's tokens, three matmuls,
index_add), all in one run on the same inputs, printed as ratios.

Variants: the loop; the sort-based layout with one matmul per expert segment (grouped_mm_reference);
and sputnik_kernels.moe as dispatched — on CUDA the Triton kernels, on CPU the torch path (torch._grouped_mm
where the strides allow). Triton only runs interpreted on CPU, so there the Triton path is checked
by tests/kernels, not timed.

Run: `python benchmarks/moe_dispatch.py` (CPU: tiny-preset shapes, fp32; CUDA: DeepSeek-V2-Lite
expert shapes, bf16), or pick shapes: `--tokens 4096 --dim 128 --inter 64 --experts 8 --topk 2`.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F

from sputnik_kernels.moe import grouped_mm, grouped_mm_reference, permute, routing_metadata, unpermute
from sputnik_kernels.swiglu import swiglu

DEFAULTS = {  # tokens, dim, inter, experts, topk, dtype
    "cpu": dict(tokens=4096, dim=128, inter=64, experts=8, topk=2, dtype="float32"),  # configs/models/tiny.yaml
    "cuda": dict(tokens=16384, dim=2048, inter=1408, experts=64, topk=6, dtype="bfloat16"),  # DeepSeek-V2-Lite
}


def sorted_experts(x_TD, ids_TK, w_TK, w1, w3, w2, mm=grouped_mm):
    meta = routing_metadata(ids_TK, w1.shape[0])
    x_PD = permute(x_TD, meta)
    h_PI = swiglu(mm(x_PD, w1, meta.offsets_E), mm(x_PD, w3, meta.offsets_E))
    return unpermute(mm(h_PI, w2, meta.offsets_E), meta, w_TK)


def segment_loop_experts(*inputs):
    return sorted_experts(*inputs, mm=grouped_mm_reference)


def loop_experts(x_TD, ids_TK, w_TK, w1, w3, w2):
    """Baseline (transformers' eager experts): for each expert, find its tokens by masking."""
    out = torch.zeros_like(x_TD)
    for e in range(w1.shape[0]):
        token, j = torch.where(ids_TK == e)
        if token.numel() == 0:
            continue
        xe = x_TD[token]
        h = F.silu(xe @ w1[e]) * (xe @ w3[e])
        out.index_add_(0, token, (h @ w2[e]) * w_TK[token, j, None])
    return out


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def step(fn, inputs, dy) -> torch.Tensor:
    y = fn(*inputs)
    torch.autograd.backward(y, dy)
    return y.detach()


def tokens_per_s(fn, inputs, dy, steps, device) -> float:
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step(fn, inputs, dy)
    sync(device)
    return steps * inputs[0].shape[0] / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for k in DEFAULTS["cpu"]:
        ap.add_argument(f"--{k}", type=str if k == "dtype" else int)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=9, help="rounds over all variants, interleaved")
    a = ap.parse_args()
    cfg = {k: getattr(a, k) if getattr(a, k) is not None else v for k, v in DEFAULTS[a.device].items()}
    T, D, I, E, k, dtype = cfg["tokens"], cfg["dim"], cfg["inter"], cfg["experts"], cfg["topk"], getattr(torch, cfg["dtype"])

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(T, E, generator=g).softmax(-1)  # uniform-ish random routing
    w_TK, ids_TK = scores.topk(k, dim=-1)
    inputs = [torch.randn(T, D, generator=g), w_TK, torch.randn(E, D, I, generator=g) / D**0.5,
              torch.randn(E, D, I, generator=g) / D**0.5, torch.randn(E, I, D, generator=g) / I**0.5]
    inputs = [t.to(a.device, dtype).requires_grad_(True) for t in inputs]
    inputs.insert(1, ids_TK.to(a.device))
    dy = torch.randn(T, D, generator=g).to(a.device, dtype)

    variants = {"loop over experts": ("torch", loop_experts), "sorted, per-segment mm": ("torch", segment_loop_experts),
                "sorted, sputnik_kernels.moe": ("auto", sorted_experts)}  # auto: Triton on CUDA, torch on CPU
    outputs, tps = {}, {name: [] for name in variants}
    for name, (mode, fn) in variants.items():  # warm-up (Triton compiles here); outputs to compare
        os.environ["SPUTNIK_KERNELS"] = mode
        outputs[name] = step(fn, inputs, dy)
    for _ in range(a.repeats):  # interleaved, so load from other jobs hits every variant alike
        for name, (mode, fn) in variants.items():
            os.environ["SPUTNIK_KERNELS"] = mode
            tps[name].append(tokens_per_s(fn, inputs, dy, a.steps, a.device))

    if a.device == "cuda":
        machine = f"{torch.cuda.get_device_name()}"
    else:
        machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"machine: {machine}, torch {torch.__version__}")
    print(f"{T} tokens, dim {D}, expert inter {I}, {E} experts, top-{k}, {cfg['dtype']}, forward+backward, "
          f"{a.repeats} rounds x {a.steps} steps; best round (least disturbed by other jobs) and median")
    best = {name: max(v) for name, v in tps.items()}
    median = {name: sorted(v)[len(v) // 2] for name, v in tps.items()}
    base = "loop over experts"
    print(f"{'':24s} {'best tok/s':>11s} {'ratio':>7s} {'median tok/s':>13s} {'ratio':>7s}  max |y - loop|")
    for name in variants:
        err = (outputs[name].float() - outputs[base].float()).abs().max().item()
        print(f"{name:24s} {best[name]:11.0f} {best[name] / best[base]:6.2f}x {median[name]:13.0f} "
              f"{median[name] / median[base]:6.2f}x  {err:.1e}")


if __name__ == "__main__":
    main()
