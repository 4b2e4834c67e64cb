"""Generation throughput on CPU: MLA latent cache vs no cache (full re-forward each token), and vs
transformers' generate() on the same weights (exported with model.hf.save_hf_pretrained).

Each way is warmed up once, then timed in --repeats interleaved rounds (medians printed, with
the spread of the per-round ratios). Run: `python benchmarks/model_generate.py [--new 256] [--batch 4] [--repeats 3]`.

`--rollout`: instead, GRPO-sized sampling (16 prompts x 8 completions, up to 64 new tokens,
temperature 1, --stops token ids end a row, so lengths spread as in rollouts) with finished rows
dropped from the batch (generate's default compact_fraction) vs kept to the end. Sampled outputs
differ between the two (the batch a draw is made from differs), so tokens/s counts the tokens
each way actually generated.
"""

from __future__ import annotations

import argparse
import inspect
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


def rollout(model, a):
    torch.manual_seed(1)
    prompts = [p for p in torch.randint(0, model.args.vocab, (16, a.prompt)).tolist() for _ in range(8)]
    stops = list(range(a.stops))

    def run(fraction, seed):
        t, outs = timed(lambda: generate(model, prompts, max_new_tokens=64, temperature=1.0, stop_token_ids=stops, seed=seed,
                                         compact_fraction=fraction))
        return t, sum(len(o) for o in outs)

    default = inspect.signature(generate).parameters["compact_fraction"].default
    ways = {"drop finished rows": default, "keep them": 1.0}
    res = {name: [] for name in ways}
    for name, f in ways.items():
        run(f, 0)  # warm-up
    for r in range(a.repeats):
        for name, f in ways.items():
            res[name].append(run(f, r))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"tiny preset, 128 rows (16 prompts x 8), prompt {a.prompt}, up to 64 new tokens, temperature 1, "
          f"{a.stops} stop ids; {a.repeats} interleaved rounds (seed = round); compact_fraction {default} vs 1")
    rate = {}
    for name, v in res.items():
        tok = np.array([n for _, n in v])
        rate[name] = np.array([n / t for t, n in v])
        print(f"{name:20s}: {np.median(rate[name]):8.1f} tokens/s, {tok.mean() / len(prompts):5.1f} tokens per row (mean)")
    r = rate["drop finished rows"] / rate["keep them"]
    print(f"ratio: {np.median(rate['drop finished rows']) / np.median(rate['keep them']):.2f}x (per round {r.min():.2f}..{r.max():.2f})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rollout", action="store_true", help="GRPO-sized sampling: finished rows dropped vs kept")
    ap.add_argument("--stops", type=int, default=16, help="--rollout: how many token ids end a row")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = Transformer(load_model_args("tiny", init_std=0.05)).eval()
    if a.rollout:
        return rollout(model, a)
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
