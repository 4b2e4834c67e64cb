"""The price of `rollout.exact` (model/exact.py) on CPU, and the sampler/learner gap it removes.

The tiny preset, randomly initialised: 32 prompts of 8-23 tokens, 48 new tokens at temperature 1
with `model.generate.sample` (the sampler's decode path: latent cache, one token at a time), then
the learner's path (`Transformer.token_logprobs` over the full sequences, forward + backward).
Exact mode off and on in --repeats interleaved rounds; medians of tokens/s, their ratio, and the
mean / max |sampler log-prob - learner log-prob| over the generated tokens each way.
Run: `python benchmarks/model_exact.py [--repeats 3] [--threads 1]`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from model import Transformer, load_model_args
from model.generate import sample


def one_round(model, prompts, seed: int):
    t = time.perf_counter()
    gen = sample(model, prompts, max_new_tokens=48, temperature=1.0, seed=seed)
    decode_tps = sum(map(len, gen.tokens)) / (time.perf_counter() - t)
    seqs = [p + c for p, c in zip(prompts, gen.tokens)]
    tokens_BT = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens_BT[b, : len(s)] = torch.tensor(s)
    t = time.perf_counter()
    logp_BT = model.token_logprobs(tokens_BT[:, :-1], tokens_BT[:, 1:])
    logp_BT.sum().backward()
    learn_tps = sum(map(len, seqs)) / (time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    delta = torch.cat([(logp_BT.detach()[b, len(p) - 1 : len(p) - 1 + len(c)] - gen.logprobs[b]).abs()
                       for b, (p, c) in enumerate(zip(prompts, gen.tokens))])
    return decode_tps, learn_tps, delta.mean().item(), delta.max().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = Transformer(load_model_args("tiny")).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 500, (int(torch.randint(8, 24, (1,), generator=g)),), generator=g).tolist() for _ in range(32)]
    rows = {False: [], True: []}
    for rep in range(a.repeats):
        for exact in (False, True):
            model.set_exact(exact)
            rows[exact].append(one_round(model, prompts, seed=rep))
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {a.threads} thread(s), {a.repeats} rounds")
    print("| | exact off | exact on | on/off |\n|---|---|---|---|")
    for i, name in ((0, "sampler decode, generated tokens/s"), (1, "learner forward+backward, tokens/s")):
        off, on = (statistics.median(r[i] for r in rows[x]) for x in (False, True))
        print(f"| {name} | {off:.0f} | {on:.0f} | {on / off:.2f}x |")
    for i, name in ((2, "mean |delta log-prob|"), (3, "max |delta log-prob|")):
        print(f"| {name} | {max(r[i] for r in rows[False]):.2e} | {max(r[i] for r in rows[True]):.2e} | |")


if __name__ == "__main__":
    main()
