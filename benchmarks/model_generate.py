"""Generation throughput on CPU: MLA latent cache vs no cache (full re-forward each token), and vs
transformers' generate() on the same weights (exported with model.hf.save_hf_pretrained).

Each way is warmed up once, then timed in --repeats interleaved rounds (medians printed, with
the spread of the per-round ratios). Run: `python benchmarks/model_generate.py [--new 256] [--batch 4] [--repeats 3]`.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np
import torch

from model import Transformer, load_model_args
from model.generate import generate
from model.hf import save_hf_pretrained


@torch.no_grad()
def uncached_greedy(model, prompts, n):
    seqs = torch.tensor(prompts)
    for _ in range(n):
        nxt = model(seqs)[:, -1].argmax(-1, keepdim=True)
        seqs = torch.cat([seqs, nxt], dim=1)
    return seqs[:, len(prompts[0]) :].tolist()


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = Transformer(load_model_args("tiny", init_std=0.05)).eval()
    prompts = torch.randint(0, model.args.vocab, (a.batch, a.prompt)).tolist()
    n_tokens = a.batch * a.new
    runs = {
        "cache": lambda: generate(model, prompts, max_new_tokens=a.new, temperature=0),
        "plain": lambda: uncached_greedy(model, prompts, a.new),
    }
    try:
        import transformers
    except ImportError:
        transformers = None
        print("transformers not installed: skipping the comparison with its generate()")
    d = tempfile.TemporaryDirectory()
    if transformers is not None:
        save_hf_pretrained(model, d.name)
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(d.name).float().eval()
        ids = torch.tensor(prompts)
        runs["hf"] = lambda: hf.generate(ids, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, pad_token_id=0)
    outs = {name: fn() for name, fn in runs.items()}  # warm-up, and the outputs compared below
    times = {name: [] for name in runs}
    for _ in range(a.repeats):  # interleaved, so that drift in the machine's speed hits all alike
        for name, fn in runs.items():
            times[name].append(timed(fn)[0])
    t = {name: np.array(v) for name, v in times.items()}
    med = {name: float(np.median(v)) for name, v in t.items()}
    same = sum(x == y for x, y in zip(outs["cache"], outs["plain"]))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"tiny preset, batch {a.batch}, prompt {a.prompt}, {a.new} new tokens (greedy); identical outputs: {same}/{a.batch}; "
          f"medians of {a.repeats} interleaved rounds")
    print(f"latent cache : {n_tokens / med['cache']:8.1f} tokens/s")
    print(f"no cache     : {n_tokens / med['plain']:8.1f} tokens/s")
    r = t["plain"] / t["cache"]
    print(f"ratio cache/no-cache: {med['plain'] / med['cache']:.2f}x (per round {r.min():.2f}..{r.max():.2f})")
    if "hf" in runs:
        same_hf = sum(outs["hf"][b, a.prompt :].tolist() == outs["cache"][b] for b in range(a.batch))
        r = t["hf"] / t["cache"]
        print(f"transformers : {n_tokens / med['hf']:8.1f} tokens/s (identical outputs: {same_hf}/{a.batch})")
        print(f"ratio ours/transformers: {med['hf'] / med['cache']:.2f}x (per round {r.min():.2f}..{r.max():.2f})")
    d.cleanup()


if __name__ == "__main__":
    main()
