"""The GRPO learner's batch: the module the DeepSpeed engine wraps (log-probs, entropy and what the
mismatch meter reads, from one trunk pass), the samples that enter the loss packed into
right-padded rows, length-sorted micro-batches, and the samplers' behaviour (log-probs, routed
experts) laid out beside them with the mismatch terms it gives (issues 20 and 26).

Test: `pytest tests/orchestrator/test_orch_learner.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from orchestrator.grpo.rollout import RolloutChunk


def _observe(logits_BTV: torch.Tensor, logp_BT: torch.Tensor, targets: torch.Tensor, temperature: float):
    """(entropy of the next-token distribution, log p(targets) at the sampling temperature) [B, T]
    from the full logits; greedy rows (temperature 0) carry the untempered policy's log-probs."""
    logp_BTV = torch.log_softmax(logits_BTV, dim=-1)
    entropy_BT = -(logp_BTV.exp() * logp_BTV).sum(-1)
    if temperature in (0.0, 1.0):
        return entropy_BT, logp_BT
    return entropy_BT, torch.log_softmax(logits_BTV / temperature, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)


class LogProbs(nn.Module):
    """What the DeepSpeed engine wraps: tokens [B, T] -> log p(targets) [B, T], and with
    `entropy=True` also the entropy of the next-token distribution [B, T] (from full logits)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @torch.no_grad()
    def measure(self, tokens: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
        """(log p(targets), entropy, log p(targets) at the sampling temperature) [B, T] each, one
        trunk pass; the first two exactly as forward(entropy=True) gives them."""
        m = self.model
        h_BTD = m.norm(m.hidden(tokens))
        logp_BT = m.head(h_BTD, targets, mode="logprobs")
        return (logp_BT, *_observe(m.head(h_BTD).float(), logp_BT, targets, temperature))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor, entropy: bool = False, measure: float | None = None):
        """log p(targets) [B, T]; `entropy=True` adds the (differentiable) entropy [B, T]; `measure`
        (a sampling temperature) adds what measure() reads besides the log-probs, detached, from
        this same trunk pass: (entropy, log p at the temperature) (issue 26: the on-policy minibatch
        needs no pass of its own)."""
        m = self.model
        if not entropy and measure is None:
            return m.token_logprobs(tokens, targets)
        # one trunk pass; the target log-probs by the same fused head as token_logprobs (so that
        # old and new log-probs agree bit for bit), the entropy from the full logits
        h_BTD = m.norm(m.hidden(tokens))
        logp_BT = m.head(h_BTD, targets, mode="logprobs")
        out = [logp_BT]
        if entropy:
            logp_BTV = torch.log_softmax(m.head(h_BTD).float(), dim=-1)
            out.append(-(logp_BTV.exp() * logp_BTV).sum(-1))
        if measure is not None:
            with torch.no_grad():
                out.append(_observe(m.head(h_BTD.detach()).float(), logp_BT.detach(), targets, measure))
        return tuple(out)


# Fixed cost of one forward + backward call in token-equivalents: rows of a minibatch are split
# into length-sorted micro-batches only where the padding saved is worth more than this per extra
# call. CPU: tuned on the tiny model for issue 26 (~10 ms per call, ~80 us per token; 256 measured
# a little faster than 128, both ~1.3x fewer CPU seconds than no split). CUDA: a
# guess, not measured (kernel launches dominate a small micro-batch).
MICRO_OVERHEAD_TOKENS = {"cpu": 256, "cuda": 4096}


def length_micro_batches(rows: list[int], lengths: list[int], overhead: int | None = None) -> list[list[int]]:
    """`rows` split into micro-batches of similar length, each padded only to its own longest row:
    sorted by length, the split that minimises sum(rows x longest) + overhead per micro-batch
    (default: MICRO_OVERHEAD_TOKENS["cpu"])."""
    overhead = MICRO_OVERHEAD_TOKENS["cpu"] if overhead is None else overhead
    order = sorted(rows, key=lambda r: lengths[r])
    n = len(order)
    best, cut = [0] + [float("inf")] * n, [0] * (n + 1)  # best[j]: cost of order[:j]; cut[j]: start of its last micro-batch
    for j in range(1, n + 1):
        for i in range(j):
            c = best[i] + (j - i) * lengths[order[j - 1]] + overhead
            if c < best[j]:
                best[j], cut[j] = c, i
    out, j = [], n
    while j > 0:
        out.append(order[cut[j] : j])
        j = cut[j]
    return out[::-1]


def pack_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int):
    """Right-padded inputs/targets [B, T-1] and the completion mask (1 where a target is a completion token)."""
    seqs = [p + c for p, c in zip(prompt_ids, completion_ids)]
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T - 1)
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        s = p + c
        tokens[b, : len(s)] = torch.tensor(s)
        mask[b, len(p) - 1 : len(s) - 1] = 1.0
    return tokens[:, :-1], tokens[:, 1:], mask


def kept_samples(advantages: list[float | None], chunks: tuple[RolloutChunk, ...]) -> tuple[list, list, list]:
    """(prompt ids, completion ids, advantages) of the samples that enter the loss, in chunk order:
    those with an advantage (kept groups, not filtered) and a non-empty completion."""
    prompts, completions, adv = [], [], []
    flat = [(p, c) for ch in chunks for p, c in zip(ch.prompt_ids, ch.completion_ids)]
    for (p, c), a in zip(flat, advantages):
        if a is not None and c:
            prompts.append(p)
            completions.append(c)
            adv.append(a)
    return prompts, completions, adv


def kept_behaviour(advantages: list[float | None], chunks: tuple[RolloutChunk, ...]) -> dict:
    """What the samplers recorded for the samples `kept_samples` keeps, in the same order:
    {"logprobs": [len(c)] each or None, "experts": [L, len(p)+len(c)-1, K] each or None,
    "versions": policy version per sample, "temperature"}. None where a chunk carries none."""
    logprobs, experts, versions, temps = [], [], [], set()
    for ch in chunks:
        temps.add(ch.temperature)
        for i, c in enumerate(ch.completion_ids):
            logprobs.append(ch.logprobs[i] if ch.logprobs is not None else None)
            experts.append(ch.experts[i] if ch.experts is not None else None)
            versions.append(ch.versions[i])
    keep = [i for i, (a, ids) in enumerate(zip(advantages, [c for ch in chunks for c in ch.completion_ids])) if a is not None and ids]
    assert len(temps) <= 1, f"one step's chunks were sampled at different temperatures {temps}"
    lp, ex = [logprobs[i] for i in keep], [experts[i] for i in keep]
    return {"logprobs": lp if lp and all(x is not None for x in lp) else None,
            "experts": ex if ex and all(x is not None for x in ex) else None,
            "versions": [versions[i] for i in keep], "temperature": temps.pop() if temps else 1.0}


def behaviour_rows(prompts: list[list[int]], logprobs: list[torch.Tensor], width: int) -> torch.Tensor:
    """Sampler log-probs placed at their targets' positions in the pack_batch layout: [B, width]."""
    out = torch.zeros(len(prompts), width)
    for b, (p, lp) in enumerate(zip(prompts, logprobs)):
        out[b, len(p) - 1 : len(p) - 1 + len(lp)] = lp.float()
    return out


def expert_rows(experts: list[torch.Tensor], width: int, k: int) -> torch.Tensor:
    """Sampler expert ids per input position, right-padded to the pack_batch layout: [B, L, width, K]
    (padding routes to experts 0..K-1: those positions come after every target that counts)."""
    L = experts[0].shape[0]
    out = torch.arange(k).expand(len(experts), L, width, k).clone()
    for b, e in enumerate(experts):
        out[b, :, : e.shape[1]] = e.long()
    return out


def replay_experts(mb: dict) -> torch.Tensor | None:
    """A (mini)batch's sampler experts as [L, B, T, K] for Transformer.routing_replay (None: no replay)."""
    return mb["replay"].transpose(0, 1) if "replay" in mb else None


def behaviour_terms(cfg, learner_logp: torch.Tensor, routed_LBTK: torch.Tensor, mask: torch.Tensor, prompts: list[list[int]],
                    beh: dict, lag: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
    """(metrics, importance weights [B, T] or None) of the learner's samples against the sampler's
    behaviour (`beh`: kept_behaviour of these samples; `lag` [B]: policy versions between them).
    The mismatch meter (`mismatch/*`) reads the samples of the learner's own version, `mismatch/lagged/*`
    the older ones (the driver records the lag per sample: rollout/version_lag*); `learner_logp` is
    at the sampling temperature, as the sampler's."""
    from rl.grpo import behaviour_mismatch, importance_weights, routing_mismatch

    if beh["logprobs"] is None:
        if cfg.importance != "none":
            raise ValueError("grpo.importance needs the samplers' log-probs, and these rollout chunks carry none")
        return {}, None
    width = mask.shape[1]
    sampler_logp = behaviour_rows(prompts, beh["logprobs"], width)
    out: dict = {}
    same = (lag == 0).unsqueeze(1).to(mask.dtype)
    for prefix, m in (("mismatch/", mask * same), ("mismatch/lagged/", mask * (1 - same))):
        if not m.any():
            continue
        out.update({prefix + k: v for k, v in behaviour_mismatch(learner_logp, sampler_logp, m).items()})
        if beh["experts"] is not None and routed_LBTK.numel():
            sampler_LBTK = expert_rows(beh["experts"], width, routed_LBTK.shape[-1]).transpose(0, 1)
            out.update({prefix + k: v for k, v in routing_mismatch(routed_LBTK, sampler_LBTK, m).items()})
    if cfg.importance == "none":
        return out, None
    is_w, is_m = importance_weights(learner_logp, sampler_logp, mask, mode=cfg.importance, cap=cfg.is_cap)
    return {**out, **is_m}, is_w


def stack_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Right-pad per-sample rows to [len(rows), width] (the pack_batch layout)."""
    out = torch.zeros(len(rows), width)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r[:width]
    return out
