"""Batched sampling with the MLA latent KV cache.

Prompts of different lengths are left-padded into one batch; each row's RoPE positions start at 0
at its first real token and padded slots are masked out, so a row's output does not depend on the
other rows. The prompt is prefilled in one forward pass, then one token per step is decoded
against the cache (absorbed MLA: only kv_lora_rank + qk_rope_head_dim values per token and layer).

`generate(...)` returns only the new tokens of each prompt; generation of a row stops after it
emits one of `stop_token_ids` (the stop token is included in the output) or after max_new_tokens.
Rows that have stopped are dropped from the batch once they are `compact_fraction` of it (GRPO
rollouts stop at very different lengths), so the remaining steps cost only what the unfinished rows
need. Each row's draw at each step uses its own uniform number (one per row and step from the
seeded generator, inverse-CDF sampling), so a row's tokens do not depend on which other rows share
its batch: the same whatever the fraction, and the same when the rows are split over processes.

Expert-parallel sampling (issue 21, `group=`): a model whose routed experts are split over the K
processes of a group (model/parallel.py `apply_expert_parallel`) samples as one. Every member calls
`sample` with the same prompts and seed; each decodes a contiguous share of the rows (its own
attention and latent cache: data-parallel attention, as DeepSeek-V3 serves), the MoE layers send
each (token, expert) pair to the expert's owner all-to-all, the members step in lockstep until the
last row of the group stops, and every member returns the whole batch's Generation. The tokens are
those of one process holding the whole model (up to rounding in the logits).

`sample(...)` returns the same tokens with what RL needs from the sampler (issue 20): per generated
token the log-probability under the distribution it was drawn from (after temperature and top-p;
greedy rows get the untempered policy's), and per main-model MoE layer the experts each input
position was routed to ([L, prompt + completion - 1, K], uint8, or int16 above 256 experts).

`static=True` (or a `decoder=`) decodes the same tokens with fixed shapes, so that on CUDA each
step is one CUDA graph replay (issue 24; model/static_decode.py says how); without `group`.

Test: `pytest tests/model/test_model_generate.py`; benchmark: `python benchmarks/model_generate.py`
(`--static`: static vs dynamic vs transformers).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from model.transformer import Transformer

if TYPE_CHECKING:
    from model.static_decode import StaticDecoder


def sample_next(logits_BV: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator | None = None,
                uniform_B: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy when temperature == 0, else nucleus sampling at the given temperature: [B].
    Inverse-CDF: row b takes the first token whose cumulative probability exceeds uniform_B[b] (drawn
    from `generator` when not given), so a row's draw depends on its own logits and number only."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    probs = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, sorted_i, sorted_p)
    if uniform_B is None:
        uniform_B = torch.rand(probs.shape[0], generator=generator, device=probs.device)
    cdf = probs.cumsum(-1)  # non-decreasing: a token with no mass never owns an interval
    idx = torch.searchsorted(cdf, uniform_B.to(cdf.device).unsqueeze(1) * cdf[:, -1:], right=True).squeeze(1)
    # a draw at the very top (rounding) would land past the end: the last token with mass
    last = probs.shape[1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.minimum(idx, last)


def sampled_logprob(logits_BV: torch.Tensor, tokens_B: torch.Tensor, *, temperature: float, top_p: float) -> torch.Tensor:
    """log-prob of `tokens` under the distribution `sample_next` draws from: softmax(logits / T),
    renormalised over the top-p nucleus; temperature 0 (greedy) gives the untempered policy's. [B] fp32."""
    t = temperature if temperature > 0 else 1.0
    logp_BV = torch.log_softmax(logits_BV.float() / t, dim=-1)
    logp_B = logp_BV.gather(-1, tokens_B.unsqueeze(-1)).squeeze(-1)
    if top_p < 1.0 and temperature > 0:
        probs = torch.softmax(logits_BV.float() / temperature, dim=-1)  # as sample_next
        sorted_p = probs.sort(dim=-1, descending=True).values
        kept = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0).sum(-1)
        logp_B = logp_B - kept.log()
    return logp_B


@dataclasses.dataclass
class Generation:
    """`sample`'s output, one entry per prompt."""

    tokens: list[list[int]]  # new tokens
    logprobs: list[torch.Tensor]  # [len(tokens)] fp32: log-prob of each under the sampling distribution
    experts: list[torch.Tensor] | None  # [L, len(prompt) + len(tokens) - 1, K]: routed experts per input position (None: no MoE)


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
    group: dist.ProcessGroup | None = None,
    static: bool = False,
    decoder: StaticDecoder | None = None,
) -> list[list[int]]:
    """New tokens of each prompt (`sample` without the routed experts: see there)."""
    return sample(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop_token_ids=stop_token_ids,
                  seed=seed, pad_id=pad_id, compact_fraction=compact_fraction, record_experts=False, group=group, static=static,
                  decoder=decoder).tokens


@torch.no_grad()
def sample(
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
    record_experts: bool = True,
    group: dist.ProcessGroup | None = None,
    static: bool = False,
    decoder: StaticDecoder | None = None,
) -> Generation:
    """New tokens of each prompt, their sampling log-probs and (with record_experts) routed experts.
    compact_fraction: finished rows leave the batch once they are this fraction of it (0: as soon
    as one finishes, 1: never). At 0.25 the copy of the caches is paid back within a few steps;
    benchmarks/model_generate.py --rollout times it against 1. group: the expert-parallel group the
    model's routed experts are split over (see the module docstring); every member passes the same
    arguments and gets the same Generation.
    static: decode with fixed shapes (model/static_decode.py: row buckets instead of compaction, a
    preallocated cache, the stop check read every few tokens), each step a CUDA graph on CUDA; the
    same tokens, log-probs to rounding. decoder: a StaticDecoder whose buffers and captured graphs
    this call reuses (implies static; default: a new one sized for this call)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate() needs at least one prompt and no empty prompt")
    if not 0 <= compact_fraction <= 1:
        raise ValueError(f"compact_fraction must be in [0, 1] (got {compact_fraction})")
    max_prompt = max(len(p) for p in prompts)
    if max_prompt + max_new_tokens > model.args.max_seq_len:
        raise ValueError(f"longest prompt ({max_prompt}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len {model.args.max_seq_len}")
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop_token_ids=stop_token_ids, seed=seed,
              pad_id=pad_id, compact_fraction=compact_fraction, record_experts=record_experts)
    if (static or decoder is not None) and group is not None and dist.get_world_size(group) > 1:
        raise ValueError("static decoding does not support expert-parallel sampling (group=): its all-to-all sizes are read on the "
                         "host every layer; use static=False")
    was_training = model.training
    model.eval()
    try:
        if static or decoder is not None:
            from model.static_decode import StaticDecoder  # it builds on this module

            decoder = decoder or StaticDecoder(model, rows=len(prompts), max_len=max_prompt + max_new_tokens)
            if decoder.model is not model:
                raise ValueError("this StaticDecoder was made for another model: make one for the model that samples")
            kw.pop("compact_fraction")  # row buckets take its place
            return decoder.sample(prompts, **kw)
        if group is None or dist.get_world_size(group) == 1:
            return _sample_rows(model, prompts, first_row=0, total_rows=len(prompts), group=None, **kw)
        ep, rank = dist.get_world_size(group), dist.get_rank(group)
        bounds = [len(prompts) * r // ep for r in range(ep + 1)]  # member r decodes rows bounds[r]:bounds[r + 1]
        lo, hi = bounds[rank], bounds[rank + 1]
        # a member with no rows still takes part in every exchange, with one throw-away row
        mine = _sample_rows(model, prompts[lo:hi] or [[pad_id]], first_row=lo, total_rows=len(prompts), group=group, **kw)
        parts: list = [None] * ep
        dist.all_gather_object(parts, mine if hi > lo else None, group=group)
        parts = [p for p in parts if p is not None]
        return Generation(tokens=[t for p in parts for t in p.tokens], logprobs=[t for p in parts for t in p.logprobs],
                          experts=[t for p in parts for t in p.experts] if record_experts and parts[0].experts is not None else None)
    finally:
        model.train(was_training)


def prefill(model: Transformer, prompts: list[list[int]], caches: list, *, pad_id: int) -> torch.Tensor:
    """Forward of the left-padded prompts into cache slots 0 .. max_prompt - 1: the logits of each
    prompt's last token [B, V]. Causal within a prompt, padded slots masked, RoPE positions counted
    from each row's first real token (both decoding paths start here)."""
    device = model.embed.weight.device
    B, T = len(prompts), max(len(p) for p in prompts)
    tokens_BT = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens_BT[b, T - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
    pad_B = torch.tensor([T - len(p) for p in prompts], device=device)
    slots = torch.arange(T, device=device)
    causal = slots.unsqueeze(0) <= slots.unsqueeze(1)  # (T, S)
    mask = causal.unsqueeze(0) & (slots.unsqueeze(0) >= pad_B.unsqueeze(1))[:, None, :]
    mask = mask | torch.eye(T, dtype=torch.bool, device=device).unsqueeze(0)  # pad rows attend to themselves
    positions_BT = (slots.unsqueeze(0) - pad_B.unsqueeze(1)).clamp(min=0)
    return model(tokens_BT, start_pos=0, caches=caches, positions_BT=positions_BT, mask_BTS=mask)[:, -1]


def _all_done(left: int, group: dist.ProcessGroup | None) -> bool:
    """No row left unfinished: of this batch (`left`), or of every member's batch (one small all-reduce a step)."""
    if group is None:
        return left == 0
    total = torch.tensor([left])
    dist.all_reduce(total, group=group)
    return int(total) == 0


def _sample_rows(model: Transformer, prompts: list[list[int]], *, first_row: int, total_rows: int, group: dist.ProcessGroup | None,
                 max_new_tokens: int, temperature: float, top_p: float, stop_token_ids, seed: int | None, pad_id: int,
                 compact_fraction: float, record_experts: bool) -> Generation:
    """`sample` for rows first_row .. first_row + len(prompts) of a batch of total_rows (their
    random numbers), in lockstep with the other members of `group`."""
    device = model.embed.weight.device
    B = len(prompts)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    max_prompt = max(len(p) for p in prompts)
    total = max_prompt + max_new_tokens
    pad_BS = torch.tensor([max_prompt - len(p) for p in prompts], device=device)
    slots = torch.arange(total, device=device)
    valid_BS = slots.unsqueeze(0) >= pad_BS.unsqueeze(1)  # real (non-pad) cache slots
    positions_BS = (slots.unsqueeze(0) - pad_BS.unsqueeze(1)).clamp(min=0)
    caches = model.new_caches(B, total)
    stop = torch.tensor(list(stop_token_ids) or [-1], device=device)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.full((B,), max_new_tokens, device=device)
    rows = torch.arange(B, device=device)  # the original rows still in the batch, in batch order
    done = torch.zeros(B, dtype=torch.bool, device=device)  # per row of the batch
    logp_out = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
    moe = model.main_moe_layers() if record_experts else []
    K = model.args.n_activated_experts
    # experts per cache slot: (L, B, slot, K); a small dtype, they travel with the rollout
    experts_LBSK = torch.zeros(len(moe), B, total, K, dtype=torch.uint8 if model.args.n_routed_experts <= 256 else torch.int16,
                               device=device) if moe else None

    logits = prefill(model, prompts, caches, pad_id=pad_id)
    if moe:
        experts_LBSK[:, :, :max_prompt] = model.routed_experts().view(len(moe), B, max_prompt, K).to(experts_LBSK.dtype)
    for i in range(max_new_tokens):
        # one number per row of the whole batch and step, whichever rows are left here
        u = torch.rand(total_rows, generator=generator, device=device)[first_row + rows] if temperature > 0 else None
        nxt = sample_next(logits, temperature=temperature, top_p=top_p, uniform_B=u)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out[rows, i] = nxt
        logp_out[rows, i] = sampled_logprob(logits, nxt, temperature=temperature, top_p=top_p)
        hit = torch.isin(nxt, stop) & ~done
        lengths[rows[hit]] = i + 1
        done |= hit
        n_done = int(done.sum())
        if i == max_new_tokens - 1 or _all_done(len(rows) - n_done, group):
            break
        if n_done and n_done >= compact_fraction * len(rows) and len(rows) > 1:
            # Enough of the batch has finished: drop those rows (their cache slots, positions and
            # masks too), so that later steps cost only what the unfinished rows need. A member of
            # an expert-parallel group whose rows have all finished keeps one, to step with the others.
            keep = (~done).nonzero().squeeze(1) if n_done < len(rows) else torch.zeros(1, dtype=torch.long, device=device)
            rows, nxt, done = rows[keep], nxt[keep], done[keep]
            valid_BS, positions_BS = valid_BS[keep], positions_BS[keep]
            for c in caches:
                c.buf_BSL = c.buf_BSL[keep]
        pos = max_prompt + i
        step_mask = valid_BS[:, None, : pos + 1]
        logits = model(nxt.unsqueeze(1), start_pos=pos, caches=caches, positions_BT=positions_BS[:, pos : pos + 1], mask_BTS=step_mask)[:, -1]
        if moe:
            experts_LBSK[:, rows, pos] = model.routed_experts().to(experts_LBSK.dtype)
    n = [int(x) for x in lengths]
    pads = [max_prompt - len(p) for p in prompts]
    return Generation(
        tokens=[out[b, : n[b]].tolist() for b in range(B)],
        logprobs=[logp_out[b, : n[b]].cpu() for b in range(B)],
        experts=[experts_LBSK[:, b, pads[b] : max_prompt + n[b] - 1].cpu() for b in range(B)] if moe else None)
