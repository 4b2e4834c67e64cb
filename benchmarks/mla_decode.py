"""Absorbed MLA decode attention (sputnik_kernels/mla_decode.py): the Triton kernel vs the torch path
(`mla_decode_reference`: bmm, fp32 softmax, bmm, the math MLA._absorbed runs without the kernel) at
DeepSeek-V3's shapes (128 heads, kv_lora_rank 512, RoPE 64, bf16), one decode step (T=1) of 64 and
128 rows against 1K and 4K cached slots with generate()'s left-padding mask, plus 4 rows against 4K
slots (the split-K case). Both are timed in the same run; the kernel's bandwidth counts the cache
bytes it must read once (B x S x 576 x 2), against the device's measured copy bandwidth.
Row-block sizes 16 (the default), 32 and 64 are timed too, to choose the untuned default.

Run: `python benchmarks/mla_decode.py` on a CUDA GPU (part of benchmarks/kernel_suite.py). Without
CUDA it says so and exits 0: the kernel is checked by `pytest tests/kernels/test_kernels_mla_decode.py`.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

H, C, R = 128, 512, 64  # DeepSeek-V3 heads, kv_lora_rank, qk_rope_head_dim
SCALE = (128 + 64) ** -0.5
SHAPES = [(64, 1024), (64, 4096), (128, 1024), (128, 4096), (4, 4096)]  # (rows, cached slots)


def bench(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters  # ms


def copy_bandwidth() -> float:
    x = torch.empty(2**28, device="cuda", dtype=torch.float32)  # 1 GiB
    ms = bench(lambda: x.clone(), 10)
    return 2 * x.numel() * 4 / ms / 1e9  # TB/s, read + write


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/mla_decode.py: no CUDA GPU on this machine, nothing to measure; the kernel is checked against "
              "its torch reference by `pytest tests/kernels/test_kernels_mla_decode.py` (Triton interpreted on CPU).")
        return 0
    from triton.errors import TritonError

    from sputnik_kernels.mla_decode import mla_decode_reference, mla_decode_triton

    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {bw:.2f} TB/s; "
          f"H={H} C={C} R={R} bf16, T=1")
    print("| rows | slots | torch ms | Triton ms (block_m 16) | TB/s | % of copy | torch / Triton | block_m 32 ms | block_m 64 ms | max |err| |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for B, S in SHAPES:
            q = torch.randn(B, 1, H, C + R, device="cuda", dtype=torch.bfloat16, generator=g)
            cache = torch.randn(B, S, C + R, device="cuda", dtype=torch.bfloat16, generator=g)
            pads = torch.randint(0, S // 4, (B,), device="cuda", generator=g)
            mask = (torch.arange(S, device="cuda").unsqueeze(0) >= pads.unsqueeze(1))[:, None, :]  # generate()'s step mask
            args = (q, cache, C, SCALE, mask)
            ref_ms = bench(partial(mla_decode_reference, *args), a.iters)
            ms = {}
            for bm in (16, 32, 64):
                try:
                    ms[bm] = bench(partial(mla_decode_triton, *args, block_m=bm), a.iters)
                except (TritonError, RuntimeError) as e:  # a tile that does not fit the SM's registers / shared memory
                    print(f"block_m {bm}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    ms[bm] = float("nan")
            err = (mla_decode_triton(*args).float()
                   - mla_decode_reference(q.float(), cache.float(), C, SCALE, mask)).abs().max().item()
            tbs = B * S * (C + R) * 2 / ms[16] / 1e9
            print(f"| {B} | {S} | {ref_ms:.3f} | {ms[16]:.3f} | {tbs:.2f} | {100 * tbs / bw:.0f}% | {ref_ms / ms[16]:.2f}x | "
                  f"{ms[32]:.3f} | {ms[64]:.3f} | {err:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
