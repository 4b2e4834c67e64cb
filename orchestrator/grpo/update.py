"""The optimizer steps of one GRPO update, as PolicyLearner runs them: global minibatches (every
rank takes the same number of steps), each split into length-sorted micro-batches whose losses are
the minibatch's aggregation in shares, gradients accumulated over them; the step's first minibatch
is on-policy and records its own measurements (issue 26). A mixin of PolicyLearner, which supplies
`engine`, `cfg`, `rank`, `world`, `device` and `max_new_tokens`.

Test: `pytest tests/orchestrator/test_orch_learner.py`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from orchestrator.grpo.batch import MICRO_OVERHEAD_TOKENS, length_micro_batches, replay_experts


class MinibatchUpdates:
    """PolicyLearner's update steps (see the module docstring)."""

    def _lockstep(self) -> bool:
        """Whether every rank must run the same number of forward/backward calls: ZeRO-2 reduces
        gradients in every backward, ZeRO-3 also gathers parameters in every forward, expert
        parallelism exchanges tokens in every forward."""
        return (self.cfg.zero_stage >= 2 and self.world > 1) or self.experts is not None

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
        the same number of steps; a rank with too few rows gets an empty minibatch there, which
        `_update` runs as a weightless filler (the collectives stay in step, no row counts twice)."""
        cfg = self.cfg
        n_mb = max(1, -(-n_total // max(self.world, min(cfg.minibatch_size, n_total))))
        per_mb = -(-n_local // n_mb)
        g = torch.Generator().manual_seed(step)
        plan = []
        for _ in range(cfg.epochs):
            order = torch.randperm(n_local, generator=g)
            plan.append([order[k * per_mb : (k + 1) * per_mb] for k in range(n_mb)])
        return plan

    def _epochs(self, batch: dict, plan: list[list[torch.Tensor]], seen: dict, lengths: list[int]) -> dict:
        """`grpo.epochs` passes over the batch in global minibatches; the mean of each metric over updates."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}  # a filler step (no rows on this rank) reports only the global grad norm
        updates = 0
        for epoch, minibatches in enumerate(plan):
            for k, idx in enumerate(minibatches):
                for key, v in self._update(batch, idx.tolist(), seen, lengths, on_policy=epoch == 0 and k == 0).items():
                    sums[key] = sums.get(key, 0.0) + v
                    counts[key] = counts.get(key, 0) + 1
                updates += 1
        out = {k: v / counts[k] for k, v in sums.items()}
        out["updates"] = updates
        return out

    def _update(self, batch: dict, idx: list[int], seen: dict, lengths: list[int], *, on_policy: bool) -> dict:
        """One optimizer step on the minibatch `idx` (gradients accumulated over its micro-batches);
        its loss metrics and the gradient norm before clipping. `on_policy`: the step's first
        minibatch, whose old log-probs (and measurements) come from its own forward."""
        from rl.grpo import grpo_loss, importance_weights

        cfg, dev = self.cfg, self.device
        filler = not idx  # this rank has no rows here: a row's forward, backward and step at weight 0 keep the ranks in step
        if filler:
            idx = [0]
        # the aggregation's count over the whole minibatch: each micro-batch's loss is its share
        local = 0.0 if filler else float(batch["mask"][idx].sum()) if cfg.aggregation == "token" else float(len(idx))
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
            # through the backward: the recompute of activation checkpointing must replay the same experts
            with self.engine.module.model.routing_replay(replay_experts(mb)):
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
                loss_sum += float(loss.detach())  # this rank's share, before the rescaling below
                if self.world > 1 or filler:
                    loss = loss * (0.0 if filler else scale)
                if len(micro) > 1:  # one gradient reduction per minibatch, at its last micro-batch
                    self.engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
                self.engine.backward(loss)
            # the metrics of the whole minibatch: token-weighted means, the max of the maxima
            t = float(m.sum())
            n_tok += t
            r_max = mets.pop("ratio_max")
            ratio_max = r_max if ratio_max is None else max(ratio_max, r_max)
            for k, v in mets.items():
                weighted[k] = weighted.get(k, 0.0) + v * t
        grad_norm = None
        if self.experts is not None:  # owned experts: summed over their owners, their norm joins DeepSpeed's
            self.experts.reduce()
        if cfg.zero_stage == 0:  # DeepSpeed records the norm only inside its ZeRO optimizers
            norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
            grad_norm = float(torch.stack(norms).norm()) if norms else 0.0
            if self.experts is not None:
                grad_norm = (grad_norm ** 2 + self.experts.norm ** 2) ** 0.5
        lr = self.engine.get_lr()[0]
        self.engine.step()
        if cfg.zero_stage > 0:
            gn = self.engine.get_global_grad_norm()
            grad_norm = float(gn) if gn is not None else float("nan")
        if self.experts is not None:
            self.experts.step(lr, grad_norm)
        if filler:
            return {"grad_norm": grad_norm}
        mets = {k: v / n_tok if n_tok else 0.0 for k, v in weighted.items()}
        return {"loss": loss_sum, **mets, "ratio_max": ratio_max, "grad_norm": grad_norm}
