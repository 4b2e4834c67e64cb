"""Fused linear cross-entropy vs the naive head (logits materialised), forward + backward, in one run:
milliseconds and peak extra memory, at DeepSeek-V3's vocabulary (129,280) and hidden size (7,168).

Run: `python benchmarks/cross_entropy.py [--tokens 8192] [--dim 7168] [--vocab 129280]` on a CUDA
GPU (bf16; the fused head twice, its per-chunk softmax in torch ops and in the Triton row
kernel); on CPU it runs a small shape in fp32 (the memory figure is then from tracemalloc-free
arithmetic: the size of the logits that were or were not held).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from sputnik_kernels.cross_entropy import fused_linear_cross_entropy, reference_cross_entropy


def run(fn, h, w, t, iters, cuda):
    def once():
        h.grad = w.grad = None
        fn(h, w, t).backward()

    for _ in range(2):
        once()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(iters):
        once()
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / iters * 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
    return ms, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=7168)
    ap.add_argument("--vocab", type=int, default=129280)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda:
        a.tokens, a.dim, a.vocab, a.iters = 2048, 256, 8192, 3
    dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    g = torch.Generator(device=dev).manual_seed(0)
    h = (torch.randn(a.tokens, a.dim, device=dev, dtype=dt, generator=g) * 0.02).requires_grad_()
    w = (torch.randn(a.vocab, a.dim, device=dev, dtype=dt, generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, a.vocab, (a.tokens,), device=dev, generator=g)
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, {a.tokens} tokens x {a.dim} -> vocab {a.vocab}, {dt}")
    with torch.no_grad():
        gap = (fused_linear_cross_entropy(h, w, t) - reference_cross_entropy(h, w, t)).abs().item()
    naive_ms, naive_mem = run(reference_cross_entropy, h, w, t, a.iters, cuda)
    print(f"naive (logits materialised)        : {naive_ms:8.2f} ms  peak extra {naive_mem:6.2f} GiB")
    # the fused head's per-chunk loss and gradient: torch ops, or the Triton row kernel (CUDA only)
    for backend in ("torch", "triton") if cuda else ("torch",):
        os.environ["SPUTNIK_KERNELS"] = backend
        fused_ms, fused_mem = run(fused_linear_cross_entropy, h, w, t, a.iters, cuda)
        print(f"fused (chunked, {backend + ' rows)':19s}: {fused_ms:8.2f} ms  peak extra {fused_mem:6.2f} GiB  "
              f"time ratio naive/fused {naive_ms / fused_ms:.2f}x; memory ratio {naive_mem / fused_mem:.1f}x")
    print(f"|loss difference| fused vs naive {gap:.2e}")
    logits_gib = a.tokens * a.vocab * 4 / 2**30
    print(f"(fp32 logits for this shape would be {logits_gib:.2f} GiB)")


if __name__ == "__main__":
    main()
