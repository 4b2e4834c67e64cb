"""MoE token dispatch on CPU: sort-based contiguous segments vs a per-expert masking loop.

Forward + backward tokens/s of the tiny preset, both in one run (medians of interleaved repeats),
printed as ratios: for the routed experts alone (what the dispatch changes), one MoE layer with its
gate and shared expert, and the whole model (where attention and dense layers dilute the difference).
Run: `python benchmarks/model_dispatch.py [--tokens 4096] [--seq 256] [--steps 10] [--repeats 3]`.

`--decode`: instead, forward only (no grad) of one layer's routed experts at decoding sizes (1-64
tokens): the sorted path, the per-pair path that MoE takes for a few tokens on CPU
(Experts._forward_pairs) and the loop, to show where the pair path pays.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from model import Transformer, load_model_args
from sputnik_kernels.moe import permute, routing_metadata, unpermute


def per_expert_loop(moe, x_ND, w_NK, idx_NK):
    """Baseline, as in transformers' eager DeepseekV3Experts: for each expert, find its tokens by
    masking, one fused gate|up matmul, the down projection, index_add into the output."""
    out = torch.zeros_like(x_ND)
    w13 = torch.cat([moe.experts.w1, moe.experts.w3], dim=2)
    for e in range(moe.n_experts):
        token, k = torch.where(idx_NK == e)
        if token.numel() == 0:
            continue
        gate, up = (x_ND[token] @ w13[e]).chunk(2, dim=-1)
        out.index_add_(0, token, ((F.silu(gate) * up) @ moe.experts.w2[e]) * w_NK[token, k, None])
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


def bench_routed(fn, x_ND, w_NK, idx_NK, steps):
    """Only what the dispatch changes: the routed experts, given the gate's choices."""
    fn(x_ND, w_NK, idx_NK).square().mean().backward()
    t = time.perf_counter()
    for _ in range(steps):
        fn(x_ND, w_NK, idx_NK).square().mean().backward()
    return steps * x_ND.shape[0] / (time.perf_counter() - t)


@torch.no_grad()
def decode_table(model, repeats, calls=200):
    layer = model.moe_layers()[0]
    experts = layer.experts
    E, D = layer.n_experts, model.args.dim

    def sorted_path(x, w, idx):
        meta = routing_metadata(idx, E)
        return unpermute(experts(permute(x, meta), meta.offsets_E), meta, w)

    ways = {"sorted": sorted_path, "pairs": lambda x, w, idx: experts(x, pairs=(w, idx)),
            "loop": lambda x, w, idx: per_expert_loop(layer, x, w, idx)}
    print(f"one MoE layer's routed experts, forward, no grad ({E} experts, top-{layer.topk}, dim {D}); "
          f"us per call, best of {repeats} rounds of {calls}")
    print(f"{'tokens':>6s} {'pairs':>5s} {'gathered':>9s} " + " ".join(f"{n:>8s}" for n in ways) + "  sorted/pairs")
    for n in (1, 2, 4, 8, 16, 32, 64):
        x = torch.randn(n, D)
        w, idx, _ = layer.gate(x)
        outs = {name: fn(x, w, idx) for name, fn in ways.items()}
        for name, y in outs.items():
            assert torch.allclose(y, outs["loop"], atol=1e-5), name  # the same computation
        best = {}
        for name, fn in ways.items():
            t = []
            for _ in range(repeats):
                for _ in range(10):
                    fn(x, w, idx)
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn(x, w, idx)
                t.append((time.perf_counter() - t0) / calls * 1e6)
            best[name] = min(t)
        used = "*" if n * layer.topk * experts.pair_bytes() <= layer.pair_path_bytes else " "
        print(f"{n:6d} {n * layer.topk:5d} {n * layer.topk * experts.pair_bytes() / 2**20:7.2f}MB "
              + " ".join(f"{best[k]:8.1f}" for k in ways) + f"  {best['sorted'] / best['pairs']:5.2f}x {used}")
    print(f"* = taken by MoE (ModelArgs.moe_pair_path_bytes = {layer.pair_path_bytes})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode", action="store_true", help="only the decoding-size table (forward, no grad)")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = Transformer(load_model_args(a.preset)).train()
    if a.decode:
        print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
        return decode_table(model.eval(), max(a.repeats, 3))
    tokens = torch.randint(0, model.args.vocab, (a.tokens // a.seq, a.seq + 1))
    layer = model.moe_layers()[0]
    x = torch.randn(a.tokens // a.seq, a.seq, model.args.dim, requires_grad=True)
    moes = model.moe_layers()  # the MTP module's too
    sorted_fns = [m.routed for m in moes]
    loop_fns = [lambda x, w, idx, _m=m: per_expert_loop(_m, x, w, idx) for m in moes]
    with torch.no_grad():
        w_NK, idx_NK, _ = layer.gate(x.detach().reshape(-1, model.args.dim))
    x_ND = x.detach().reshape(-1, model.args.dim).requires_grad_()
    runs = {"sort": [], "loop": []}
    for _ in range(a.repeats):  # interleaved, so that drift in the machine's speed hits both alike
        for name, fns in (("sort", sorted_fns), ("loop", loop_fns)):
            for m, fn in zip(moes, fns):
                m.routed = fn
            runs[name].append((bench_routed(fns[0], x_ND, w_NK, idx_NK, a.steps), bench_layer(layer, x, a.steps),
                               *bench(model, tokens, a.steps)))
    sort, loop = (np.array(runs[n]) for n in ("sort", "loop"))
    l1, l2 = np.median(sort[:, 3]), np.median(loop[:, 3])
    assert abs(l1 - l2) < 1e-3 * abs(l1), (l1, l2)  # same computation
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"preset {a.preset}, {a.tokens} tokens/step, forward+backward, {a.steps} steps, {a.repeats} interleaved repeats")
    print(f"{'tokens/s (median)':28s} {'sort-based':>11s} {'expert loop':>11s} {'ratio':>6s}  ratio per repeat (min..max)")
    for i, what in enumerate(("routed experts only", "one MoE layer (gate+shared)", "whole model")):
        ratios = sort[:, i] / loop[:, i]
        print(f"{what:28s} {np.median(sort[:, i]):11.0f} {np.median(loop[:, i]):11.0f} {np.median(sort[:, i]) / np.median(loop[:, i]):5.2f}x"
              f"  {ratios.min():.2f}..{ratios.max():.2f}")


if __name__ == "__main__":
    main()
