"""The policy learner: one rank of a DeepSpeed group that applies the GRPO update, and the frozen
reference model (colocated with each learner, or in an actor of its own with `grpo.reference=actor`).

Each step every rank receives the step's rollout chunks (Ray resolves the ObjectRefs the driver
passed) and one advantage per completion, keeps the samples that enter the loss, takes its
interleaved share, then runs `grpo.epochs` passes of minibatch updates of `rl.grpo.grpo_loss`.
Minibatches are global: every rank takes the same number of optimizer steps, and the loss is
rescaled so that the DeepSpeed gradient average over ranks is the update of the whole minibatch.

Each thing is computed once (issue 26): the step's first minibatch is on-policy, so its "old"
log-probs are its training forward's, detached, and that forward also gives its rows' entropy,
tempered log-probs and experts; one no-grad forward measures the other rows before any update.
Every forward runs length-sorted micro-batches padded to their own longest row
(`length_micro_batches`), gradients accumulated over a minibatch's micro-batches with each
micro-batch's loss its share of the minibatch's aggregation. `train_threads` sets the torch
threads of an update (for a sync learner on a quiet machine, the idle samplers' cores; not wired
to the config: on a loaded shared machine 2 threads measured several times slower than 1). The
loss and gradients are today's to rounding
(tests/orchestrator/test_orch_learner.py::test_update_equals_the_plain_reference).

Sampler/learner agreement (issue 20): the chunks carry the sampler's behaviour log-probs and routed
experts. In the no-grad pass the learner measures its own against them on the samples of its
current policy version (`mismatch/*`: |delta log-prob| mean and max, the k3 KL, the fraction of
tokens routed to a different expert set, per layer; `mismatch/lagged/*` for samples of older
versions, where the gap includes the policy change); `grpo.importance` turns the ratio into
per-token weights of the surrogate (rl.grpo.importance_weights), and `grpo.router_replay` routes
every rollout token to the sampler's experts in both passes. With `exact` (rollout.exact) the
policy runs in the batch-invariant mode, so that its log-probs equal the sampler's bit for bit.
The comparison is at the sampling temperature; with rollout.top_p < 1 the sampler's log-probs are
of the truncated distribution it drew from, so the meter and the ratio include the truncation.

Test: `pytest tests/orchestrator/test_orch_grpo.py tests/orchestrator/test_orch_learner.py`.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from torch import nn

from orchestrator.grpo.rollout import RolloutChunk, load_policy, state_hash


def _observe(logits_BTV: torch.Tensor, logp_BT: torch.Tensor, targets: torch.Tensor, temperature: float):
    """(entropy of the next-token distribution, log p(targets) at the sampling temperature) [B, T]
    from the full logits; greedy rows (temperature 0) carry the untempered policy's log-probs."""
    logp_BTV = torch.log_softmax(logits_BTV, dim=-1)
    entropy_BT = -(logp_BTV.exp() * logp_BTV).sum(-1)
    if temperature in (0.0, 1.0):
        return entropy_BT, logp_BT
    return entropy_BT, torch.log_softmax(logits_BTV / temperature, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)


class _LogProbs(nn.Module):
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


def _behaviour_rows(prompts: list[list[int]], logprobs: list[torch.Tensor], width: int) -> torch.Tensor:
    """Sampler log-probs placed at their targets' positions in the pack_batch layout: [B, width]."""
    out = torch.zeros(len(prompts), width)
    for b, (p, lp) in enumerate(zip(prompts, logprobs)):
        out[b, len(p) - 1 : len(p) - 1 + len(lp)] = lp.float()
    return out


def _expert_rows(experts: list[torch.Tensor], width: int, k: int) -> torch.Tensor:
    """Sampler expert ids per input position, right-padded to the pack_batch layout: [B, L, width, K]
    (padding routes to experts 0..K-1: those positions come after every target that counts)."""
    L = experts[0].shape[0]
    out = torch.arange(k).expand(len(experts), L, width, k).clone()
    for b, e in enumerate(experts):
        out[b, :, : e.shape[1]] = e.long()
    return out


def _replay(mb: dict) -> torch.Tensor | None:
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
    sampler_logp = _behaviour_rows(prompts, beh["logprobs"], width)
    out: dict = {}
    same = (lag == 0).unsqueeze(1).to(mask.dtype)
    for prefix, m in (("mismatch/", mask * same), ("mismatch/lagged/", mask * (1 - same))):
        if not m.any():
            continue
        out.update({prefix + k: v for k, v in behaviour_mismatch(learner_logp, sampler_logp, m).items()})
        if beh["experts"] is not None and routed_LBTK.numel():
            sampler_LBTK = _expert_rows(beh["experts"], width, routed_LBTK.shape[-1]).transpose(0, 1)
            out.update({prefix + k: v for k, v in routing_mismatch(routed_LBTK, sampler_LBTK, m).items()})
    if cfg.importance == "none":
        return out, None
    is_w, is_m = importance_weights(learner_logp, sampler_logp, mask, mode=cfg.importance, cap=cfg.is_cap)
    return {**out, **is_m}, is_w


class ReferenceModel:
    """The frozen reference policy in its own actor (`grpo.reference=actor`): the learners get its
    log-probs of the step's samples instead of holding a second model each."""

    def __init__(self, init_dir: str, *, pad_id: int, threads: int = 1, batch: int = 64):
        torch.set_num_threads(threads)
        self.model = _LogProbs(load_policy(init_dir).eval().requires_grad_(False))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.pad_id, self.batch = pad_id, batch

    @torch.no_grad()
    def logprobs(self, advantages: list[float | None], *chunks: RolloutChunk) -> list[torch.Tensor]:
        """log p_ref(target) at every position of each kept sample (length len(prompt + completion) - 1)."""
        prompts, completions, _ = kept_samples(advantages, chunks)
        out: list[torch.Tensor] = []
        for lo in range(0, len(prompts), self.batch):
            p, c = prompts[lo : lo + self.batch], completions[lo : lo + self.batch]
            tokens, targets, _ = pack_batch(p, c, self.pad_id)
            logp = self.model(tokens.to(self.device), targets.to(self.device)).float().cpu()
            out += [logp[b, : len(p[b]) + len(c[b]) - 1].clone() for b in range(len(p))]
        return out


def _stack_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Right-pad per-sample rows to [len(rows), width] (the pack_batch layout)."""
    out = torch.zeros(len(rows), width)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r[:width]
    return out


class PolicyLearner:
    """One rank of the learner group; all ranks get the same calls in the same order.

    `grpo_cfg` is the `grpo:` section; `max_new_tokens` the generation budget (the constant of
    `grpo.aggregation=constant`); `threads` the torch threads of the actor, `train_threads` those
    of an update (None: the same)."""

    def __init__(self, init_dir: str, grpo_cfg, *, rank: int, world: int, master_addr: str, master_port: int,
                 pad_id: int, seed: int, max_new_tokens: int, threads: int = 1, train_threads: int | None = None,
                 exact: bool = False):
        from orchestrator.ds_config import deepspeed_config, import_deepspeed

        torch.set_num_threads(threads)
        self.train_threads = train_threads  # torch threads inside train() (sync mode: the idle samplers' cores too)
        os.environ.update({"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
                           "WORLD_SIZE": str(world), "LOCAL_RANK": "0"})  # Ray shows each learner only its own GPU
        deepspeed = import_deepspeed()
        on_gpu = torch.cuda.is_available()
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)
        self.cfg, self.rank, self.world, self.pad_id, self.max_new_tokens = grpo_cfg, rank, world, pad_id, max_new_tokens
        torch.manual_seed(seed)
        model = load_policy(init_dir).set_exact(exact)
        self.ref = None
        if grpo_cfg.kl_beta > 0 and grpo_cfg.reference == "colocated":
            self.ref = _LogProbs(load_policy(init_dir).eval().requires_grad_(False))
        ds_cfg = deepspeed_config(
            micro_batch_size=max(1, grpo_cfg.minibatch_size // world), grad_accum=1, world_size=world, zero_stage=grpo_cfg.zero_stage,
            lr=grpo_cfg.lr, betas=tuple(grpo_cfg.betas), weight_decay=grpo_cfg.weight_decay, grad_clip=grpo_cfg.grad_clip, bf16=on_gpu)
        self.engine, *_ = deepspeed.initialize(model=_LogProbs(model), model_parameters=model.parameters(), config=ds_cfg)
        self.device = self.engine.device
        self.version = 0
        self.sync = None  # weight_sync.SyncGroup on rank 0, with grpo.weight_sync=collective

    # --- weights -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full policy state on rank 0 (ZeRO-3 shards gathered on every rank), None elsewhere."""
        module = self.engine.module.model
        if self.cfg.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        else:
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        return state if self.rank == 0 else None

    def weights_meta(self):
        """Names, shapes and dtypes of the policy state, in the order a collective sync packs them (rank 0)."""
        from orchestrator.grpo.weight_sync import weights_meta

        s = self.state_dict()
        return weights_meta(s) if s is not None else None

    def device_type(self) -> str:
        return self.device.type

    def join_sync_group(self, addr: str, port: int, *, tag: str, world: int, meta, backend: str, timeout_s: float) -> bool:
        from orchestrator.grpo.weight_sync import SyncGroup

        assert self.rank == 0, "learner rank 0 sends the weights"
        self.sync = None
        self.sync = SyncGroup(addr, port, rank=0, world=world, tag=tag, meta=meta, backend=backend, timeout_s=timeout_s)
        return True

    def publish(self, broadcast: bool) -> tuple[int, dict[str, torch.Tensor] | None, bool]:
        """(version, the state on rank 0, whether the broadcast to the samplers went through). The
        state is returned either way: a failed broadcast falls back to the object store."""
        state = self.state_dict()  # every rank: ZeRO-3 gathers
        sent = False
        if broadcast and self.rank == 0 and self.sync is not None:
            try:
                self.sync.send(state)
                sent = True
            except Exception as e:  # a sampler died or timed out: the driver makes a new group
                print(f"learner: weight broadcast failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
                self.sync = None
        return self.version, state, sent

    def weights_hash(self) -> str | None:
        s = self.state_dict()
        return state_hash(s) if s is not None else None

    # --- one GRPO update ---------------------------------------------------------------------

    def train(self, advantages: list[float | None], step: int, *chunks: RolloutChunk, reference: list[torch.Tensor] | None = None) -> dict:
        """GRPO update on this rank's share of the step's samples.

        `advantages`: one value per completion in chunk order, None for those that leave the loss
        (dropped groups, filtered overlong completions). `reference`: the reference actor's
        log-probs of the kept samples (`ReferenceModel.logprobs`), when it is not colocated.
        """
        threads = torch.get_num_threads()
        torch.set_num_threads(self.train_threads or threads)
        try:
            return self._train(advantages, step, chunks, reference)
        finally:
            torch.set_num_threads(threads)

    def _train(self, advantages, step, chunks, reference) -> dict:
        """What train() does. Work that cannot change the result is skipped (issue 26): the first
        minibatch of a step is on-policy, so its "old" log-probs are its own training forward's,
        detached (ratio exp(logp - logp.detach()) = 1, the same gradient), and that forward also
        gives the entropy, tempered log-probs and experts the metrics read, measured under the same
        weights before any update; the no-grad pass runs only for the other rows. Every forward
        sees length-sorted micro-batches padded to their own longest row."""
        t0 = time.perf_counter()
        prompts, completions, adv = kept_samples(advantages, chunks)
        mine = list(range(self.rank, len(adv), self.world))  # this rank's share, interleaved
        if not mine:
            return {"samples": 0}
        my_prompts, my_completions = [prompts[i] for i in mine], [completions[i] for i in mine]
        tokens, targets, mask = pack_batch(my_prompts, my_completions, self.pad_id)
        (B, width), model = targets.shape, self.engine.module.model
        K, L = model.args.n_activated_experts, len(model.main_moe_layers())
        batch = {"tokens": tokens, "targets": targets, "mask": mask, "adv": torch.tensor([adv[i] for i in mine], dtype=torch.float32),
                 "old": torch.zeros(B, width)}
        beh = {k: ([v[i] for i in mine] if isinstance(v, list) else v) for k, v in kept_behaviour(advantages, chunks).items()}
        if self.cfg.router_replay and beh["experts"] is not None and L:
            batch["replay"] = _expert_rows(beh["experts"], width, K)
        if beh["logprobs"] is not None:
            batch["sampler"] = _behaviour_rows(my_prompts, beh["logprobs"], width)
        elif self.cfg.importance != "none":
            raise ValueError("grpo.importance needs the samplers' log-probs, and these rollout chunks carry none")
        # what the policy measures before this step's first update, per row: its entropy, its
        # log-probs at the sampling temperature (the mismatch meter, importance weights), its experts
        seen = {"entropy": torch.zeros(B, width), "logp_t": torch.zeros(B, width), "routed": torch.zeros(L, B, width, K, dtype=torch.long),
                "temperature": beh["temperature"]}
        lengths = [len(p) + len(c) - 1 for p, c in zip(my_prompts, my_completions)]
        plan = self._minibatches(B, n_total=len(adv), step=step)
        first = set(plan[0][0].tolist())
        rest = [b for b in range(B) if b not in first]
        if not rest and self._lockstep():
            rest = [plan[0][0][0].item()]  # keep the ranks' calls in step
        self.engine.module.eval()  # no dropout anywhere; MoE routing is the same in both modes
        with torch.no_grad():
            for rows in self._micro_batches(rest, lengths):
                w = max(lengths[r] for r in rows)
                with model.routing_replay(_replay({k: batch[k][rows][..., :w, :] for k in ("replay",) if k in batch})):
                    old, entropy, logp_t = self.engine.module.measure(tokens[rows, :w].to(self.device), targets[rows, :w].to(self.device),
                                                                        seen["temperature"])
                    self._record(batch, seen, rows, w, old, entropy, logp_t)
            if self.ref is not None:
                batch["ref"] = self.ref(tokens.to(self.device), targets.to(self.device)).float().cpu()
        if reference is not None:
            batch["ref"] = _stack_rows([reference[i] for i in mine], width)
        metrics = self._epochs(batch, plan, seen, lengths)
        entropy_mean = float((seen["entropy"] * mask).sum() / mask.sum().clamp(min=1))
        lag = torch.tensor([self.version - v for v in beh["versions"]], dtype=torch.float32)
        extra, _ = behaviour_terms(self.cfg, seen["logp_t"], seen["routed"], mask, my_prompts, beh, lag)
        metrics.update({"entropy": entropy_mean, "samples": len(mine), "learn_seconds": time.perf_counter() - t0, **extra})
        self.version += 1
        return metrics

    def _lockstep(self) -> bool:
        """Whether every rank must run the same number of forward/backward calls: ZeRO-2 reduces
        gradients in every backward, ZeRO-3 also gathers parameters in every forward."""
        return self.cfg.zero_stage >= 2 and self.world > 1

    def _micro_batches(self, rows: list[int], lengths: list[int]) -> list[list[int]]:
        if self._lockstep():
            return [sorted(rows, key=lambda r: lengths[r])] if rows else []
        return length_micro_batches(rows, lengths, MICRO_OVERHEAD_TOKENS.get(self.device.type, MICRO_OVERHEAD_TOKENS["cuda"]))

    def _record(self, batch: dict, seen: dict, rows: list[int], w: int, old, entropy, logp_t) -> None:
        """Store a micro-batch's measurements under the step's weights (rows, first w positions)."""
        model = self.engine.module.model
        batch["old"][rows, :w] = old.detach().float().cpu()
        seen["entropy"][rows, :w] = entropy.float().cpu()
        seen["logp_t"][rows, :w] = logp_t.detach().float().cpu()
        if seen["routed"].shape[0]:
            seen["routed"][:, rows, :w] = model.routed_experts().view(-1, len(rows), w, model.args.n_activated_experts).cpu()

    def _minibatches(self, n_local: int, *, n_total: int, step: int) -> list[list[torch.Tensor]]:
        """Row indices of each optimizer step, per epoch: global minibatches, so every rank takes
        the same number of steps; a rank with too few rows repeats one (the collectives stay in step)."""
        cfg = self.cfg
        n_mb = max(1, -(-n_total // max(self.world, min(cfg.minibatch_size, n_total))))
        per_mb = -(-n_local // n_mb)
        g = torch.Generator().manual_seed(step)
        plan = []
        for _ in range(cfg.epochs):
            order = torch.randperm(n_local, generator=g)
            plan.append([order[k * per_mb : (k + 1) * per_mb] if k * per_mb < n_local else order[:1] for k in range(n_mb)])
        return plan

    def _epochs(self, batch: dict, plan: list[list[torch.Tensor]], seen: dict, lengths: list[int]) -> dict:
        """`grpo.epochs` passes over the batch in global minibatches; the mean of each metric over updates."""
        sums: dict[str, float] = {}
        updates = 0
        for epoch, minibatches in enumerate(plan):
            for k, idx in enumerate(minibatches):
                for key, v in self._update(batch, idx.tolist(), seen, lengths, on_policy=epoch == 0 and k == 0).items():
                    sums[key] = sums.get(key, 0.0) + v
                updates += 1
        out = {k: v / updates for k, v in sums.items()}
        out["updates"] = updates
        return out

    def _update(self, batch: dict, idx: list[int], seen: dict, lengths: list[int], *, on_policy: bool) -> dict:
        """One optimizer step on the minibatch `idx` (gradients accumulated over its micro-batches);
        its loss metrics and the gradient norm before clipping. `on_policy`: the step's first
        minibatch, whose old log-probs (and measurements) come from its own forward."""
        from rl.grpo import grpo_loss, importance_weights

        cfg, dev = self.cfg, self.device
        # the aggregation's count over the whole minibatch: each micro-batch's loss is its share
        local = float(batch["mask"][idx].sum()) if cfg.aggregation == "token" else float(len(idx))
        scale = 1.0
        if self.world > 1:
            # DeepSpeed averages gradients over ranks: rescale so that the update is the loss of the
            # whole global minibatch, not a mean of per-rank losses over unequal shares.
            total = torch.tensor(local, device=dev)
            dist.all_reduce(total)
            scale = local * self.world / max(float(total), 1.0)
        micro = self._micro_batches(idx, lengths)
        loss_sum, n_tok, weighted, ratio_max = 0.0, 0.0, {}, None
        for i, rows in enumerate(micro):
            w = max(lengths[r] for r in rows)
            mb = {k: (t[rows][..., :w, :] if k == "replay" else t[rows][:, :w] if t.dim() == 2 else t[rows])
                  for k, t in batch.items()}
            m = mb["mask"].to(dev)
            entropy = None
            with self.engine.module.model.routing_replay(_replay(mb)):
                out = self.engine(mb["tokens"].to(dev), mb["targets"].to(dev), entropy=cfg.entropy_coef > 0,
                                  measure=seen["temperature"] if on_policy else None)
                if on_policy:
                    logp, *ent, (measured_entropy, logp_t) = out
                    entropy = ent[0] if ent else None
                    self._record(batch, seen, rows, w, logp, measured_entropy, logp_t)
                    mb["old"] = batch["old"][rows, :w]
                elif cfg.entropy_coef > 0:
                    logp, entropy = out
                else:
                    logp = out
            is_w = None
            if cfg.importance != "none":  # per token, so a micro-batch's weights are the full batch's
                is_w, _ = importance_weights(seen["logp_t"][rows, :w], mb["sampler"], mb["mask"], mode=cfg.importance, cap=cfg.is_cap)
            loss, mets = grpo_loss(
                logp.float(), mb["old"].to(dev), mb["ref"].to(dev) if "ref" in mb else None, mb["adv"].to(dev), m,
                clip_low=cfg.clip_low, clip_high=cfg.clip_high, kl_beta=cfg.kl_beta, aggregation=cfg.aggregation,
                constant_len=self.max_new_tokens, entropy=entropy, entropy_coef=cfg.entropy_coef,
                is_weights=is_w.to(dev) if is_w is not None else None, total=local if len(micro) > 1 else None)
            if self.world > 1:
                loss = loss * scale
            if len(micro) > 1:  # one gradient reduction per minibatch, at its last micro-batch
                self.engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
            self.engine.backward(loss)
            loss_sum += float(loss.detach())
            # the metrics of the whole minibatch: token-weighted means, the max of the maxima
            t = float(m.sum())
            n_tok += t
            r_max = mets.pop("ratio_max")
            ratio_max = r_max if ratio_max is None else max(ratio_max, r_max)
            for k, v in mets.items():
                weighted[k] = weighted.get(k, 0.0) + v * t
        grad_norm = None
        if cfg.zero_stage == 0:  # DeepSpeed records the norm only inside its ZeRO optimizers
            norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
            grad_norm = float(torch.stack(norms).norm()) if norms else 0.0
        self.engine.step()
        if cfg.zero_stage > 0:
            gn = self.engine.get_global_grad_norm()
            grad_norm = float(gn) if gn is not None else float("nan")
        mets = {k: v / n_tok if n_tok else 0.0 for k, v in weighted.items()}
        return {"loss": loss_sum, **mets, "ratio_max": ratio_max, "grad_norm": grad_norm}

    # --- checkpoints -------------------------------------------------------------------------

    def save(self, directory: str, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state)

    def load(self, directory: str, tag: str) -> dict:
        _, client = self.engine.load_checkpoint(directory, tag=tag)
        self.version = int(client["version"])
        return client
