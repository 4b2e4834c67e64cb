"""GRPO as pure functions (DeepSeekMath / R1-Zero), with the DAPO and Dr. GRPO options.

Implemented: group-relative advantages (divided by the group's standard deviation, or only
centred as in Dr. GRPO); the token-level clipped surrogate with separate low and high clip
ranges (DAPO clip-higher); the k3 estimator of KL(policy || reference) added inside the loss
(beta 0 or no reference skips it); aggregation over tokens ("token": mean over all valid tokens of
the batch, DAPO), per sequence ("sequence": mean per sequence then over sequences, original GRPO)
or by a constant ("constant": sum / (sequences x the generation budget), Dr. GRPO, so that no
sequence's tokens weigh more for being in a short sequence); an optional entropy bonus.
Sampler/learner agreement (issue 20): `importance_weights` corrects the surrogate for the gap
between the behaviour log-probs the sampler drew with and the learner's ("tis": truncated
importance sampling, "mis": masked importance sampling), and `behaviour_mismatch` /
`routing_mismatch` measure that gap. Left out: value models, reward normalisation across groups.

Shapes: N prompts, G completions per prompt, B = N*G sequences, T completion tokens.
Test: `pytest tests/rl/test_grpo.py`.
"""

from __future__ import annotations

import math

import torch


def group_advantages(rewards_NG: torch.Tensor, *, scale: str = "std", eps: float = 1e-6) -> torch.Tensor:
    """(r - mean) / (std + eps) per group ("std", sample std as in TRL/verl) or r - mean ("none")."""
    if rewards_NG.dim() != 2 or rewards_NG.size(1) < 2:
        raise ValueError(f"rewards must be [prompts, group >= 2], got shape {tuple(rewards_NG.shape)}")
    centred = rewards_NG - rewards_NG.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred
    if scale == "std":
        return centred / (rewards_NG.std(dim=1, keepdim=True) + eps)
    raise ValueError(f"advantage scale must be 'std' or 'none', not {scale!r}")


def zero_variance_groups(rewards_NG: torch.Tensor) -> torch.Tensor:
    """[N] bool: groups whose rewards are all equal (no learning signal; DAPO dynamic sampling drops them)."""
    return (rewards_NG == rewards_NG[:, :1]).all(dim=1)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    kl_beta: float = 0.0,
    aggregation: str = "token",
    constant_len: int | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    is_weights: torch.Tensor | None = None,
    total: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """Clipped-surrogate GRPO loss; per-token tensors [B, T], advantages [B], mask [B, T] (1 = completion token).

    `constant_len`: the normaliser of aggregation "constant" (the generation budget; default T).
    `total`: when these rows are one micro-batch of a larger minibatch, the minibatch's count that
    the aggregation divides by (tokens for "token", sequences for "sequence" and "constant"), so
    that the micro-batches' losses sum to the minibatch's; the metrics stay this call's own.
    `entropy` [B, T] with `entropy_coef` > 0 subtracts coef x entropy per token (an entropy bonus).
    `is_weights` [B, T] (detached, from `importance_weights`) multiply each token's surrogate; the KL
    and entropy terms and the aggregation's normaliser are left as they are."""
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(1)  # (B, 1)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(-adv * ratio, -adv * clipped)
    if is_weights is not None:
        per_token = per_token * is_weights.to(per_token.dtype)
    metrics = {}
    if kl_beta > 0 and ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1  # k3: unbiased, always >= 0
        per_token = per_token + kl_beta * kl
        metrics["kl"] = _masked_mean(kl, mask).item()
    if entropy is not None and entropy_coef > 0:
        per_token = per_token - entropy_coef * entropy
    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy, mask).item()
    loss = aggregate(per_token, mask, aggregation, constant_len=constant_len, total=total)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        metrics["clip_frac_low"] = ((ratio < 1 - clip_low) & (adv < 0)).to(mask.dtype).mul(mask).sum().div(n).item()
        metrics["clip_frac_high"] = ((ratio > 1 + clip_high) & (adv > 0)).to(mask.dtype).mul(mask).sum().div(n).item()
        metrics["ratio_mean"] = _masked_mean(ratio, mask).item()
        metrics["ratio_max"] = ratio.masked_fill(mask == 0, -math.inf).max().item() if mask.any() else 1.0
    return loss, metrics


def importance_weights(learner_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, *, mode: str,
                       cap: float) -> tuple[torch.Tensor, dict]:
    """Per-token weights [B, T] for the gap between the policy the loss is about and the behaviour
    policy that sampled the tokens (precision, kernels, routing, policy lag): ratio =
    exp(learner_logp - sampler_logp), detached (both [B, T]; learner_logp the "old" log-probs).

    "tis" (truncated IS, as in Yao et al. 2025 "Your efficient RL framework secretly brings you
    off-policy RL training"): min(ratio, cap). "mis" (masked IS): 1 where 1/cap <= ratio <= cap,
    else 0 (the token leaves the surrogate but still counts in the normaliser). "none": all 1."""
    if mode not in ("none", "tis", "mis"):
        raise ValueError(f"importance mode must be 'none', 'tis' or 'mis', not {mode!r}")
    ratio = torch.exp(learner_logp.detach().float() - sampler_logp.detach().float())
    m = mask.to(ratio.dtype)
    if mode == "none":
        w = torch.ones_like(ratio)
        out = 0.0
    elif mode == "tis":
        w = ratio.clamp(max=cap)
        out = _masked_mean((ratio > cap).to(m.dtype), m).item()
    else:
        keep = (ratio >= 1.0 / cap) & (ratio <= cap)
        w = keep.to(ratio.dtype)
        out = _masked_mean((~keep).to(m.dtype), m).item()
    return w * m, {"is/ratio_mean": _masked_mean(ratio, m).item(), "is/weight_mean": _masked_mean(w, m).item(),
                   "is/truncated_frac" if mode == "tis" else "is/masked_frac": out}


def behaviour_mismatch(learner_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far the learner's log-probs of the sampled tokens are from the sampler's ([B, T] each):
    mean and max |delta|, and the k3 estimate of KL(sampler || learner) from the sampler's own
    samples, d = learner - sampler: exp(d) - d - 1 (always >= 0, 0 iff equal)."""
    m = mask.to(torch.float64)
    d = learner_logp.double() - sampler_logp.double()
    k3 = torch.exp(d) - d - 1
    absd = d.abs()
    return {"logprob_abs_mean": _masked_mean(absd, m).item(),
            "logprob_abs_max": absd.masked_fill(m == 0, 0.0).max().item() if m.any() else 0.0,
            "kl": _masked_mean(k3, m).item()}


def routing_mismatch(learner_LBTK: torch.Tensor, sampler_LBTK: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Fraction of tokens (mask [B, T]) whose routed expert *set* differs between learner and
    sampler: "routing_frac" over tokens where any MoE layer differs, "routing_frac/layer_<l>" per
    layer (l counts the main model's MoE layers from 0)."""
    diff_LBT = (learner_LBTK.long().sort(-1).values != sampler_LBTK.long().sort(-1).values).any(-1)
    m = mask.to(torch.float64)
    out = {"routing_frac": _masked_mean(diff_LBT.any(0).double(), m).item()}
    for layer, d in enumerate(diff_LBT):
        out[f"routing_frac/layer_{layer}"] = _masked_mean(d.double(), m).item()
    return out


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str, *, constant_len: int | None = None,
              total: float | None = None) -> torch.Tensor:
    """Per-token losses [B, T] to one number; `total` as in grpo_loss (None: this batch's own count)."""
    if aggregation == "token":
        return (per_token * mask).sum() / (mask.sum().clamp(min=1) if total is None else max(total, 1))
    if aggregation == "sequence":
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
        return per_seq.mean() if total is None else per_seq.sum() / max(total, 1)
    if aggregation == "constant":
        return (per_token * mask).sum() / ((mask.size(0) if total is None else total) * (constant_len or mask.size(1)))
    raise ValueError(f"aggregation must be 'token', 'sequence' or 'constant', not {aggregation!r}")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
