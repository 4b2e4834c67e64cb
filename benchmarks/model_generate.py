"""Generation throughput on CPU: MLA latent cache vs no cache (full re-forward each token), and vs
transformers' generate() on the same weights (exported with model.hf.save_hf_pretrained).

Each way is warmed up once, then timed in --repeats interleaved rounds (medians printed, with
the spread of the per-round ratios). Run: `python benchmarks/model_generate.py [--new 256] [--batch 4] [--repeats 3]`.

`--rollout`: instead, GRPO-sized sampling (16 prompts x 8 completions, up to 64 new tokens,
temperature 1, --stops token ids end a row, so lengths spread as in rollouts) with finished rows
dropped from the batch (generate's default compact_fraction) vs kept to the end. Sampled outputs
differ between the two (the batch a draw is made from differs), so tokens/s counts the tokens
each way actually generated.

`--static` (issue 24): the static path (model/static_decode.py; CUDA graphs on a GPU, eager on CPU)
vs the default dynamic path vs transformers' generate() on the same weights, at GRPO shapes: 16
prompts x 8 samples = 128 rows, temperature 1. First every row runs --new tokens (no stop token:
the shapes of the issue's target, static >= 5x transformers at 128 rows x 512 new tokens on a GPU),
then static vs dynamic with --stop-rate of the vocabulary ending a row (lengths spread, so bucket
step-down meets compaction). The static decoder is made once and reused, as a rollout worker
would: its first call (graph capture) is the warm-up, timed apart. Defaults: on CUDA the `small`
preset in bf16, 128-token prompts, 512 new tokens; on CPU `tiny` in fp32, 32-token prompts, 64.
Each result line is printed as soon as it is measured (a time limit keeps what came before).
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


def synced(fn):
    def run():
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out
    return run


def static_vs_dynamic(a):
    from model.static_decode import StaticDecoder

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    preset, prompt_len, new = a.preset or ("small" if cuda else "tiny"), a.prompt or (128 if cuda else 32), a.new or (512 if cuda else 64)
    torch.manual_seed(0)
    model = Transformer(load_model_args(preset)).eval()
    rows = 128
    prompts = [p for p in torch.randint(0, model.args.vocab, (rows // 8, prompt_len)).tolist() for _ in range(8)]
    d = tempfile.TemporaryDirectory()
    try:
        import transformers

        save_hf_pretrained(model, d.name, dtype=dtype, mtp="none")  # before moving: the export reads CPU tensors
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(d.name).to(device=device, dtype=dtype).eval()
    except ImportError:
        hf = None
    model = model.to(device=device, dtype=dtype)
    name = torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"{name}, torch {torch.__version__}; {preset} preset in {dtype}, {rows} rows (16 prompts x 8), prompt {prompt_len}, "
          f"temperature 1, top-p 1; medians of {a.repeats} interleaved rounds", flush=True)
    decoder = StaticDecoder(model, rows=rows, max_len=prompt_len + new)
    stops = list(range(max(1, round(model.args.vocab * a.stop_rate))))

    def ours(static, stop_token_ids=()):
        def run(seed, n):
            outs = generate(model, prompts, max_new_tokens=n, temperature=1.0, seed=seed, stop_token_ids=stop_token_ids,
                            decoder=decoder if static else None)
            return outs, sum(len(o) for o in outs)
        return run

    def hf_generate(seed, n):
        torch.manual_seed(seed)
        out = hf.generate(torch.tensor(prompts, device=device), max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=1.0,
                          top_k=0, top_p=1.0, pad_token_id=0)
        return out, rows * n

    def measure(ways):
        """ways: name -> fn(seed, new tokens) -> (outputs, tokens). A warm-up call (the static one at
        full length: it captures the graph of every slot block), then interleaved rounds; prints
        tokens/s, returns the last round's outputs and the rates per round."""
        outs, rate = {}, {n: [] for n in ways}
        for n, fn in ways.items():
            t, _ = timed(synced(lambda: fn(0, new if n == "static" else min(new, 32))))
            print(f"  {n:24s} warm-up{' (graph capture)' if n == 'static' and cuda else ''}: {t:.2f} s", flush=True)
        for r in range(a.repeats):
            for n, fn in ways.items():
                t, (outs[n], tok) = timed(synced(lambda: fn(r + 1, new)))
                rate[n].append(tok / t)
        for n, v in rate.items():
            print(f"  {n:24s}: {np.median(v):10.1f} tokens/s", flush=True)
        return outs, {n: np.array(v) for n, v in rate.items()}

    def ratio(rate, x, y):
        r = rate[x] / rate[y]
        print(f"  ratio {x} / {y}: {np.median(rate[x]) / np.median(rate[y]):.2f}x (per round {r.min():.2f}..{r.max():.2f})", flush=True)

    print(f"every row {new} new tokens:")
    outs, rate = measure({"static": ours(True), "dynamic": ours(False)})
    print(f"  identical rows static vs dynamic: {sum(x == y for x, y in zip(outs['static'], outs['dynamic']))}/{rows}")
    ratio(rate, "static", "dynamic")
    if hf is not None:
        _, rate = measure({"transformers generate()": hf_generate, "static": ours(True)})
        ratio(rate, "static", "transformers generate()")
    print(f"{len(stops)} stop ids ({a.stop_rate:g} of the vocabulary), up to {new} new tokens:")
    outs, rate = measure({"static": ours(True, stops), "dynamic": ours(False, stops)})
    print(f"  mean tokens per row {np.mean([len(o) for o in outs['static']]):.1f}; identical rows "
          f"{sum(x == y for x, y in zip(outs['static'], outs['dynamic']))}/{rows}; static shapes (rows, slots): {decoder.shapes}")
    ratio(rate, "static", "dynamic")
    d.cleanup()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=None, help="new tokens (default 256; --static: 512 on CUDA, 64 on CPU)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 32; --static: 128 on CUDA)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rollout", action="store_true", help="GRPO-sized sampling: finished rows dropped vs kept")
    ap.add_argument("--stops", type=int, default=16, help="--rollout: how many token ids end a row")
    ap.add_argument("--static", action="store_true", help="static path (CUDA graphs) vs dynamic vs transformers at GRPO shapes")
    ap.add_argument("--preset", default=None, help="--static: model preset (default small on CUDA, tiny on CPU)")
    ap.add_argument("--stop-rate", type=float, default=1 / 128, help="--static: fraction of the vocabulary that ends a row")
    a = ap.parse_args()
    if a.static:
        return static_vs_dynamic(a)
    a.new, a.prompt = a.new or 256, a.prompt or 32
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
