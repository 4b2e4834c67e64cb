"""Generation throughput on CPU: MLA latent cache vs no cache (full re-forward each token), and vs
transformers' generate() on the same weights (exported with model.hf.save_hf_pretrained).

Run: `python benchmarks/model_generate.py [--new 256] [--batch 4]`.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

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
    a = ap.parse_args()
    torch.manual_seed(0)
    model = Transformer(load_model_args("tiny", init_std=0.05)).eval()
    prompts = torch.randint(0, model.args.vocab, (a.batch, a.prompt)).tolist()
    n_tokens = a.batch * a.new
    t_cache, out_cache = timed(lambda: generate(model, prompts, max_new_tokens=a.new, temperature=0))
    t_plain, out_plain = timed(lambda: uncached_greedy(model, prompts, a.new))
    same = sum(x == y for x, y in zip(out_cache, out_plain))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"tiny preset, batch {a.batch}, prompt {a.prompt}, {a.new} new tokens (greedy); identical outputs: {same}/{a.batch}")
    print(f"latent cache : {n_tokens / t_cache:8.1f} tokens/s")
    print(f"no cache     : {n_tokens / t_plain:8.1f} tokens/s")
    print(f"ratio cache/no-cache: {t_plain / t_cache:.2f}x")
    try:
        import transformers
    except ImportError:
        print("transformers not installed: skipping the comparison with its generate()")
        return
    with tempfile.TemporaryDirectory() as d:
        save_hf_pretrained(model, d)
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(d).float().eval()
        ids = torch.tensor(prompts)
        t_hf, out_hf = timed(lambda: hf.generate(ids, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, pad_token_id=0))
    same_hf = sum(out_hf[b, a.prompt :].tolist() == out_cache[b] for b in range(a.batch))
    print(f"transformers : {n_tokens / t_hf:8.1f} tokens/s (identical outputs: {same_hf}/{a.batch})")
    print(f"ratio ours/transformers: {t_hf / t_cache:.2f}x")


if __name__ == "__main__":
    main()
