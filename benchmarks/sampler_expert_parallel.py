"""Expert-parallel sampling (`rollout.expert_parallel`, issue 21): memory per sampler process and
decoding speed for a sampler group of K = 1, 2, 4 processes holding one model.

A random model of the chosen preset is saved once as an HF directory; each of K gloo processes
loads only its E/K routed experts from it (`from_hf_pretrained(experts=(rank, K))`), applies
`apply_expert_parallel` and samples the same batch with the same seed through
`model.generate.sample(group=...)`: each process decodes its share of the rows, the MoE layers
exchange tokens all-to-all. Per process it reports the bytes of the model's tensors it holds, its
latent KV cache, its peak RSS (the whole process: libraries, the Python heap, the allocator's
slack), and the group's completion tokens per second; the tokens are checked equal to K = 1's.
On a machine with fewer cores than K processes the tokens/s figures say little (the processes
share cores); the memory figures do not depend on it. `--dtype bfloat16` loads the weights as a bf16
sampler does (`rollout.dtype`, read straight into bf16); then the groups' tokens need not equal
K = 1's (other batch shapes per GEMM round differently in bf16).

Run: `python benchmarks/sampler_expert_parallel.py [--preset small] [--prompts 16] [--new 32] [--ks 1,2,4] [--dtype float32]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.dist_local import free_port, join_local_group


def prompts(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (int(torch.randint(8, 24, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def member(rank: int, k: int, port: int, hf_dir: str, args, out: str) -> None:
    from model.generate import sample
    from model.hf import from_hf_pretrained
    from model.parallel import apply_expert_parallel

    join_local_group(rank, k, port)
    model = from_hf_pretrained(hf_dir, experts=(rank, k) if k > 1 else None, dtype=getattr(torch, args.dtype)).eval()
    group = None
    if k > 1:
        group = dist.group.WORLD
        apply_expert_parallel(model, group, shard_weights=True)
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    elt = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    batch = prompts(args.prompts, model.args.vocab)
    rows = len(batch) * (rank + 1) // k - len(batch) * rank // k
    cache = rows * (max(map(len, batch)) + args.new) * (model.args.kv_lora_rank + model.args.qk_rope_head_dim) * elt * model.args.n_layers
    sample(model, batch[: max(k, 2)], max_new_tokens=4, seed=1, group=group)  # warm-up
    dist.barrier()
    t0 = time.perf_counter()
    gen = sample(model, batch, max_new_tokens=args.new, temperature=1.0, top_p=0.95, seed=7, group=group, record_experts=False)
    seconds = time.perf_counter() - t0
    # the process's own high-water mark (VmHWM; getrusage's ru_maxrss would carry the parent's across exec)
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    result = {"held": held, "cache": cache, "peak_rss": peak, "seconds": seconds, "tokens": gen.tokens}
    parts: list = [None] * k
    dist.all_gather_object(parts, result)
    if rank == 0:
        torch.save(parts, out)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--ks", default="1,2,4")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    from model import Transformer, load_model_args
    from model.hf import save_hf_pretrained

    ks = [int(x) for x in args.ks.split(",")]
    mib = 2 ** 20
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        m = Transformer(load_model_args(args.preset))
        total = sum(t.numel() * t.element_size() for t in m.state_dict().values())
        routed = sum(t.numel() * t.element_size() for n, t in m.state_dict().items() if ".experts.w" in n)
        save_hf_pretrained(m, f"{tmp}/hf")
        del m
        print(f"{platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}; preset {args.preset}: model tensors "
              f"{total / mib:.1f} MiB, routed experts {routed / mib:.1f} MiB ({routed / total:.0%}); {args.prompts} prompts x {args.new} new tokens; "
              f"sampler weights in {args.dtype}")
        print("K | model tensors per process, MiB | latent cache per process, MiB | peak RSS per process, MiB | tokens/s | tokens equal K=1")
        base = None
        for k in ks:
            out = f"{tmp}/k{k}.pt"
            mp.spawn(member, args=(k, free_port(), f"{tmp}/hf", args, out), nprocs=k, join=True)
            parts = torch.load(out, weights_only=False)
            toks = parts[0]["tokens"]
            base = toks if base is None else base
            n_tok = sum(len(t) for t in toks)
            secs = max(p["seconds"] for p in parts)
            print(f"{k} | {max(p['held'] for p in parts) / mib:.1f} | {max(p['cache'] for p in parts) / mib:.2f} | "
                  f"{max(p['peak_rss'] for p in parts) / mib:.0f} | {n_tok / secs:.1f} | {toks == base}")


if __name__ == "__main__":
    main()
