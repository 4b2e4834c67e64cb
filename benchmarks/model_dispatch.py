"""MoE token dispatch on CPU: sort-based contiguous segments vs a per-expert masking loop.

Forward + backward tokens/s of the tiny preset, both in one run (medians of interleaved repeats),
printed as a ratio. Run: `python benchmarks/model_dispatch.py [--tokens 4096] [--steps 10] [--repeats 3]`.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from model import Transformer, load_model_args


def per_expert_loop(moe, x_ND, w_NK, idx_NK):
    """Baseline (as in transformers' eager experts): for each expert, find its tokens by masking."""
    out = torch.zeros_like(x_ND)
    for e in range(moe.n_experts):
        token, k = torch.where(idx_NK == e)
        if token.numel() == 0:
            continue
        xe = x_ND[token]
        h = F.silu(xe @ moe.experts.w1[e]) * (xe @ moe.experts.w3[e])
        out.index_add_(0, token, (h @ moe.experts.w2[e]) * w_NK[token, k, None])
    return out


def bench(model, tokens, steps):
    loss, _ = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        loss, _ = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
    dt = time.perf_counter() - t
    return steps * tokens[:, :-1].numel() / dt, loss.item()


def bench_layer(moe, x, steps):
    y = moe(x)
    y.sum().backward()
    t = time.perf_counter()
    for _ in range(steps):
        y = moe(x)
        y.square().mean().backward()
    return steps * x.shape[0] * x.shape[1] / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = Transformer(load_model_args(a.preset)).train()
    tokens = torch.randint(0, model.args.vocab, (a.tokens // a.seq, a.seq + 1))
    layer = model.moe_layers()[0]
    x = torch.randn(a.tokens // a.seq, a.seq, model.args.dim, requires_grad=True)
    moes = model.moe_layers() + [m.block.ffn for m in model.mtp if hasattr(m.block.ffn, "routed")]
    sorted_fns = [m.routed for m in moes]
    loop_fns = [lambda x, w, idx, _m=m: per_expert_loop(_m, x, w, idx) for m in moes]
    runs = {"sort": [], "loop": []}
    for _ in range(a.repeats):  # interleaved, so that drift in the machine's speed hits both alike
        for name, fns in (("sort", sorted_fns), ("loop", loop_fns)):
            for m, fn in zip(moes, fns):
                m.routed = fn
            runs[name].append((bench_layer(layer, x, a.steps), *bench(model, tokens, a.steps)))
    (sort_layer, sort_tps, l1), (loop_layer, loop_tps, l2) = [
        tuple(float(np.median([r[i] for r in runs[n]])) for i in range(3)) for n in ("sort", "loop")]
    assert abs(l1 - l2) < 1e-3 * abs(l1), (l1, l2)  # same computation
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"preset {a.preset}, {a.tokens} tokens/step, forward+backward, {a.steps} steps, median of {a.repeats} interleaved repeats")
    print(f"one MoE layer  sort-based: {sort_layer:10.0f} tokens/s, per-expert loop: {loop_layer:10.0f} tokens/s, ratio {sort_layer / loop_layer:.2f}x")
    print("whole model:")
    print(f"sort-based dispatch : {sort_tps:10.0f} tokens/s")
    print(f"per-expert loop     : {loop_tps:10.0f} tokens/s")
    print(f"ratio sort/loop     : {sort_tps / loop_tps:.2f}x")


if __name__ == "__main__":
    main()
