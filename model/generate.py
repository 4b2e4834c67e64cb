"""Batched sampling with the MLA latent KV cache.

Prompts of different lengths are left-padded into one batch; each row's RoPE positions start at 0
at its first real token and padded slots are masked out, so a row's output does not depend on the
other rows. The prompt is prefilled in one forward pass, then one token per step is decoded
against the cache (absorbed MLA: only kv_lora_rank + qk_rope_head_dim values per token and layer).

`generate(...)` returns only the new tokens of each prompt; generation of a row stops after it
emits one of `stop_token_ids` (the stop token is included in the output) or after max_new_tokens.
Rows that have stopped are dropped from the batch once they are `compact_fraction` of it (GRPO
rollouts stop at very different lengths), so the remaining steps cost only what the unfinished rows
need. Greedy outputs are the same whatever the fraction; sampled ones are not (a draw depends on
the batch it is made from).

Test: `pytest tests/model/test_model_generate.py`; benchmark: `python benchmarks/model_generate.py`.
"""

from __future__ import annotations

import torch

from model.transformer import Transformer


def sample_next(logits_BV: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy when temperature == 0, else nucleus sampling at the given temperature: [B]."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    probs = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, sorted_i, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_token_ids: list[int] | tuple[int, ...] = (),
    seed: int | None = None,
    pad_id: int = 0,
    compact_fraction: float = 0.25,
) -> list[list[int]]:
    """New tokens of each prompt. compact_fraction: finished rows leave the batch once they are
    this fraction of it (0: as soon as one finishes, 1: never). At 0.25 the copy of the caches is
    paid back within a few steps; benchmarks/model_generate.py --rollout times it against 1."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate() needs at least one prompt and no empty prompt")
    if not 0 <= compact_fraction <= 1:
        raise ValueError(f"compact_fraction must be in [0, 1] (got {compact_fraction})")
    max_prompt = max(len(p) for p in prompts)
    total = max_prompt + max_new_tokens
    if total > model.args.max_seq_len:
        raise ValueError(f"longest prompt ({max_prompt}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len {model.args.max_seq_len}")
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    B = len(prompts)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    pad_BS = torch.tensor([max_prompt - len(p) for p in prompts], device=device)
    tokens = torch.full((B, max_prompt), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, max_prompt - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
    slots = torch.arange(total, device=device)
    valid_BS = slots.unsqueeze(0) >= pad_BS.unsqueeze(1)  # real (non-pad) cache slots
    positions_BS = (slots.unsqueeze(0) - pad_BS.unsqueeze(1)).clamp(min=0)
    caches = model.new_caches(B, total)
    stop = torch.tensor(list(stop_token_ids) or [-1], device=device)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.full((B,), max_new_tokens, device=device)
    rows = torch.arange(B, device=device)  # the original rows still in the batch, in batch order
    done = torch.zeros(B, dtype=torch.bool, device=device)  # per row of the batch

    # prefill: causal within the prompt, padded slots masked
    causal = slots[:max_prompt].unsqueeze(0) <= slots[:max_prompt].unsqueeze(1)  # (T, S)
    mask = causal.unsqueeze(0) & valid_BS[:, None, :max_prompt]
    mask = mask | torch.eye(max_prompt, dtype=torch.bool, device=device).unsqueeze(0)  # pad rows attend to themselves
    logits = model(tokens, start_pos=0, caches=caches, positions_BT=positions_BS[:, :max_prompt], mask_BTS=mask)[:, -1]
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature=temperature, top_p=top_p, generator=generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out[rows, i] = nxt
        hit = torch.isin(nxt, stop) & ~done
        lengths[rows[hit]] = i + 1
        done |= hit
        n_done = int(done.sum())
        if n_done == len(rows) or i == max_new_tokens - 1:
            break
        if n_done and n_done >= compact_fraction * len(rows):
            # Enough of the batch has finished: drop those rows (their cache slots, positions and
            # masks too), so that later steps cost only what the unfinished rows need.
            keep = (~done).nonzero().squeeze(1)
            rows, nxt, done = rows[keep], nxt[keep], done[keep]
            valid_BS, positions_BS = valid_BS[keep], positions_BS[keep]
            for c in caches:
                c.buf_BSL = c.buf_BSL[keep]
        pos = max_prompt + i
        step_mask = valid_BS[:, None, : pos + 1]
        logits = model(nxt.unsqueeze(1), start_pos=pos, caches=caches, positions_BT=positions_BS[:, pos : pos + 1], mask_BTS=step_mask)[:, -1]
    model.train(was_training)
    return [out[b, : int(lengths[b])].tolist() for b in range(B)]
