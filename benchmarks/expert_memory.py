"""Owned experts (orchestrator/expert_shard.py): memory per rank and tokens/s by expert parallel degree.

Four gloo ranks on this machine run real DeepSpeed (ZeRO-2 by default) on the same global batch with
expert parallel 1, 2 and 4, owned (each rank holds E/K experts' weights, gradients and AdamW state)
and replicated (the compute-only layout before owned experts: every rank holds every expert, ZeRO
shards their gradients and optimizer state like any weight). Per rank it reports the bytes of every
tensor alive after an optimizer step (unique storages found by walking Python's objects, gradients
included: parameters + gradients + optimizer state + DeepSpeed's buffers), the part the owned experts
account for at rest (`ExpertShard.state_bytes`: weights and AdamW moments; their fp32 gradients,
as much again as the weights, exist only within the step), the whole model's routed-expert share, and the median
tokens/s of the steps after warm-up.

Run: `python benchmarks/expert_memory.py [--stage 2] [--steps 8] [--experts 16]`.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.dist_local import free_port, join_local_group

WORLD, ROWS, SEQ = 4, 8, 64


def tensor_bytes(extra=()) -> int:
    """Bytes of the unique storages of every tensor reachable as a Python object, plus `extra`."""
    seen, total = set(), 0
    with warnings.catch_warnings():  # some objects warn when asked what they are
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if torch.is_tensor(o)] + list(extra)
    for t in tensors:
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            continue
        if s.data_ptr() in seen or s.nbytes() == 0:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def worker(rank, port, ep, layout, stage, steps, n_experts, out):
    join_local_group(rank, WORLD, port)
    from model import Transformer, load_model_args
    from model.parallel import apply_expert_parallel
    from orchestrator.config import PretrainConfig
    from orchestrator.pretrain_worker import build_engine, own_experts, train_step

    torch.manual_seed(0)
    args = load_model_args("tiny", vocab=512, dim=256, moe_inter_dim=256, n_routed_experts=n_experts,
                           n_expert_groups=4, n_limited_groups=2, mtp_depth=0)
    model = Transformer(args)
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    total = sum(p.numel() for p in model.parameters())
    p = PretrainConfig(micro_batch_size=ROWS // WORLD, zero_stage=stage, steps=steps, warmup_steps=1,
                       expert_parallel=ep, expert_weights=layout)
    experts = own_experts(model, p, rank, WORLD, bf16=False)
    if ep > 1 and layout == "replicated":
        groups = [dist.new_group(list(range(s, s + ep))) for s in range(0, WORLD, ep)]
        apply_expert_parallel(model, groups[rank // ep], shard_weights=False)
    engine, _ = build_engine(model, p, WORLD, bf16=False)
    if experts is not None:
        experts.hook_global_norm(engine)

    class Rows:
        step = 0

        def __next__(self):
            self.step += 1
            g = torch.Generator().manual_seed(self.step)
            tokens = torch.randint(0, 512, (ROWS, SEQ + 1), generator=g)
            n = ROWS // WORLD
            mine = tokens[rank * n:(rank + 1) * n]
            return {"tokens": mine[:, :-1], "targets": mine[:, 1:]}

    rows, times = Rows(), []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        train_step(engine, model, rows, 1, torch.device("cpu"), WORLD, experts=experts)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    grads = [q.grad for q in model.parameters() if q.grad is not None]
    held = tensor_bytes(grads)
    # at rest, as `held` is: the experts' gradients exist only within the step
    state = experts.state_bytes() if experts is not None else {"parameters": 0, "optimizer": 0}
    owned = state["parameters"] + state["optimizer"]
    stats = torch.tensor([held, owned], dtype=torch.float64)
    every = [torch.zeros_like(stats) for _ in range(WORLD)]
    dist.all_gather(every, stats)
    if rank == 0:
        tokens_per_s = ROWS * SEQ / statistics.median(times[steps // 2:])
        torch.save({"held": [float(t[0]) for t in every], "owned": [float(t[1]) for t in every],
                    "tokens_per_s": tokens_per_s, "routed": routed, "total": total}, out)
    dist.barrier()
    dist.destroy_process_group()


def run(ep, layout, stage, steps, n_experts, d):
    out = os.path.join(d, f"ep{ep}-{layout}.pt")
    mp.spawn(worker, args=(free_port(), ep, layout, stage, steps, n_experts, out), nprocs=WORLD, join=True)
    return torch.load(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=2, help="ZeRO stage of the non-expert weights")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--experts", type=int, default=16, help="routed experts per MoE layer")
    a = ap.parse_args()
    runs = [(1, "owned"), (2, "owned"), (4, "owned"), (2, "replicated"), (4, "replicated")]
    with tempfile.TemporaryDirectory() as d:
        res = {r: run(*r, a.stage, a.steps, a.experts, d) for r in runs}
    first = res[runs[0]]
    mb = 2 ** 20
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {WORLD} gloo ranks, ZeRO-{a.stage}, fp32, "
          f"{a.experts} routed experts/layer, {first['total'] / 1e6:.2f}M parameters of which routed experts "
          f"{first['routed'] / 1e6:.2f}M ({first['routed'] / first['total']:.0%}); global batch {ROWS} x {SEQ} tokens")
    print("| EP | experts | tensors held per rank (MiB, max over ranks) | of which owned experts (MiB) | tokens/s |")
    print("|---|---|---|---|---|")
    for (ep, layout), r in res.items():
        print(f"| {ep} | {layout if ep > 1 else '(all with ZeRO)'} | {max(r['held']) / mb:.1f} | {max(r['owned']) / mb:.1f} | {r['tokens_per_s']:.0f} |")
    for ep in (2, 4):
        o, rep = res[(ep, "owned")], res[(ep, "replicated")]
        print(f"EP {ep}: held per rank owned/EP1 {max(o['held']) / max(first['held']):.2f}x, "
              f"owned experts EP{ep}/EP2 {max(o['owned']) / max(res[(2, 'owned')]['owned']):.2f}x, "
              f"tokens/s owned/replicated {o['tokens_per_s'] / rep['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
