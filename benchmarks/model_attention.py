"""MLA training attention on CPU: v padded to the q/k head dim (SDPA's fused flash-style kernel)
vs unpadded v (SDPA's unfused math path, taken when the head dims differ).

Forward + backward tokens/s of one MLA layer and of the whole model, both settings
(ModelArgs.attn_pad_v, two models with the same weights) in one run (medians of interleaved
repeats), printed as ratios. MLA's v head dim (v_head_dim) is smaller than its q/k head dim
(qk_nope_head_dim + qk_rope_head_dim) in every DeepSeek preset.
Run: `python benchmarks/model_attention.py [--preset tiny] [--tokens 4096] [--seq 256] [--repeats 3]`.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from model import Transformer, load_model_args


def bench(fn, steps):
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    models = {}
    for pad in (True, False):  # the same weights, v padded or not (ModelArgs.attn_pad_v)
        torch.manual_seed(0)
        models[pad] = Transformer(load_model_args(a.preset, attn_pad_v=pad)).train()
    args = models[True].args
    B = a.tokens // a.seq
    tokens = torch.randint(0, args.vocab, (B, a.seq + 1))
    x = torch.randn(B, a.seq, args.dim, requires_grad=True)
    freqs = models[True].freqs_cis[: a.seq].unsqueeze(0)

    def layer_step(model):
        layer = model.layers[0]
        layer.attn(layer.attn_norm(x), freqs).square().mean().backward()

    def model_step(model):
        model.loss(tokens[:, :-1], tokens[:, 1:])[0].backward()

    runs = {True: [], False: []}
    for _ in range(a.repeats):  # interleaved, so that drift in the machine's speed hits both alike
        for pad, model in models.items():
            runs[pad].append((B * a.seq / bench(lambda: layer_step(model), a.steps),
                              B * a.seq / bench(lambda: model_step(model), a.steps)))
    padded, unpadded = np.array(runs[True]), np.array(runs[False])
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"preset {a.preset}: q/k head dim {args.qk_nope_head_dim + args.qk_rope_head_dim}, v head dim {args.v_head_dim}; "
          f"{B}x{a.seq} tokens, forward+backward, {a.steps} steps, {a.repeats} interleaved repeats")
    print(f"{'tokens/s (median)':22s} {'v padded':>10s} {'unpadded':>10s} {'ratio':>6s}  ratio per repeat (min..max)")
    for i, what in enumerate(("one MLA layer", "whole model")):
        r = padded[:, i] / unpadded[:, i]
        print(f"{what:22s} {np.median(padded[:, i]):10.0f} {np.median(unpadded[:, i]):10.0f} "
              f"{np.median(padded[:, i]) / np.median(unpadded[:, i]):5.2f}x  {r.min():.2f}..{r.max():.2f}")


if __name__ == "__main__":
    main()
