"""The policy learner: one rank of a DeepSpeed group that applies the GRPO update, and the frozen
reference model (colocated with each learner, or in an actor of its own with `grpo.reference=actor`).

Each step every rank receives the step's rollout chunks (Ray resolves the ObjectRefs the driver
passed) and one advantage per completion, keeps the samples that enter the loss, takes its
interleaved share, computes the "old" log-probs (and the policy entropy) in one no-grad forward,
then runs `grpo.epochs` passes of minibatch updates of `rl.grpo.grpo_loss`. Minibatches are
global: every rank takes the same number of optimizer steps, and the loss is rescaled so that the
DeepSpeed gradient average over ranks is the update of the whole minibatch.

Test: `pytest tests/orchestrator/test_orch_grpo.py tests/orchestrator/test_orch_learner.py`.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from torch import nn

from orchestrator.grpo.rollout import RolloutChunk, load_policy, state_hash


class _LogProbs(nn.Module):
    """What the DeepSpeed engine wraps: tokens [B, T] -> log p(targets) [B, T], and with
    `entropy=True` also the entropy of the next-token distribution [B, T] (from full logits)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor, entropy: bool = False):
        if not entropy:
            return self.model.token_logprobs(tokens, targets)
        # one trunk pass; the target log-probs by the same fused head as token_logprobs (so that
        # old and new log-probs agree bit for bit), the entropy from the full logits
        m = self.model
        h_BTD = m.norm(m.hidden(tokens))
        logp_BT = m.head(h_BTD, targets, mode="logprobs")
        logp_BTV = torch.log_softmax(m.head(h_BTD).float(), dim=-1)
        return logp_BT, -(logp_BTV.exp() * logp_BTV).sum(-1)


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
    `grpo.aggregation=constant`)."""

    def __init__(self, init_dir: str, grpo_cfg, *, rank: int, world: int, master_addr: str, master_port: int,
                 pad_id: int, seed: int, max_new_tokens: int, threads: int = 1):
        from orchestrator.ds_config import deepspeed_config, import_deepspeed

        torch.set_num_threads(threads)
        os.environ.update({"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
                           "WORLD_SIZE": str(world), "LOCAL_RANK": "0"})  # Ray shows each learner only its own GPU
        deepspeed = import_deepspeed()
        on_gpu = torch.cuda.is_available()
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)
        self.cfg, self.rank, self.world, self.pad_id, self.max_new_tokens = grpo_cfg, rank, world, pad_id, max_new_tokens
        torch.manual_seed(seed)
        model = load_policy(init_dir)
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
        t0 = time.perf_counter()
        prompts, completions, adv = kept_samples(advantages, chunks)
        mine = list(range(self.rank, len(adv), self.world))  # this rank's share, interleaved
        if not mine:
            return {"samples": 0}
        tokens, targets, mask = pack_batch([prompts[i] for i in mine], [completions[i] for i in mine], self.pad_id)
        batch = {"tokens": tokens, "targets": targets, "mask": mask, "adv": torch.tensor([adv[i] for i in mine], dtype=torch.float32)}
        self.engine.module.eval()  # no dropout anywhere; MoE routing is the same in both modes
        with torch.no_grad():
            batch["old"], entropy = self.engine.module(tokens.to(self.device), targets.to(self.device), entropy=True)
            m = mask.to(entropy.device)
            entropy_mean = float((entropy * m).sum() / m.sum().clamp(min=1))
            if self.ref is not None:
                batch["ref"] = self.ref(tokens.to(self.device), targets.to(self.device)).float()
        if reference is not None:
            batch["ref"] = _stack_rows([reference[i] for i in mine], targets.shape[1])
        metrics = self._epochs(batch, n_total=len(adv), step=step)
        metrics.update({"entropy": entropy_mean, "samples": len(mine), "learn_seconds": time.perf_counter() - t0})
        self.version += 1
        return metrics

    def _epochs(self, batch: dict, *, n_total: int, step: int) -> dict:
        """`grpo.epochs` passes over the batch in global minibatches; the mean of each metric over updates."""
        cfg = self.cfg
        n_local = len(batch["adv"])
        n_mb = max(1, -(-n_total // max(self.world, min(cfg.minibatch_size, n_total))))
        per_mb = -(-n_local // n_mb)
        sums: dict[str, float] = {}
        updates = 0
        g = torch.Generator().manual_seed(step)
        for _ in range(cfg.epochs):
            order = torch.randperm(n_local, generator=g)
            for k in range(n_mb):
                idx = order[k * per_mb : (k + 1) * per_mb]
                if len(idx) == 0:  # keep the collective calls in step across ranks
                    idx = order[:1]
                for key, v in self._update({key: t[idx] for key, t in batch.items()}).items():
                    sums[key] = sums.get(key, 0.0) + v
                updates += 1
        out = {k: v / updates for k, v in sums.items()}
        out["updates"] = updates
        return out

    def _update(self, mb: dict) -> dict:
        """One optimizer step on one minibatch; its loss metrics and the gradient norm before clipping."""
        from rl.grpo import grpo_loss

        cfg, dev = self.cfg, self.device
        m = mb["mask"].to(dev)
        entropy = None
        if cfg.entropy_coef > 0:
            logp, entropy = self.engine(mb["tokens"].to(dev), mb["targets"].to(dev), entropy=True)
        else:
            logp = self.engine(mb["tokens"].to(dev), mb["targets"].to(dev))
        loss, mets = grpo_loss(
            logp.float(), mb["old"].to(dev), mb["ref"].to(dev) if "ref" in mb else None, mb["adv"].to(dev), m,
            clip_low=cfg.clip_low, clip_high=cfg.clip_high, kl_beta=cfg.kl_beta, aggregation=cfg.aggregation,
            constant_len=self.max_new_tokens, entropy=entropy, entropy_coef=cfg.entropy_coef)
        if self.world > 1:
            # DeepSpeed averages gradients over ranks: rescale so that the update is the loss of the
            # whole global minibatch, not a mean of per-rank losses over unequal shares.
            local = m.sum() if cfg.aggregation == "token" else torch.tensor(float(m.size(0)), device=dev)
            total = local.detach().clone()
            dist.all_reduce(total)
            loss = loss * local * self.world / total.clamp(min=1)
        self.engine.backward(loss)
        grad_norm = None
        if cfg.zero_stage == 0:  # DeepSpeed records the norm only inside its ZeRO optimizers
            norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
            grad_norm = float(torch.stack(norms).norm()) if norms else 0.0
        self.engine.step()
        if cfg.zero_stage > 0:
            gn = self.engine.get_global_grad_norm()
            grad_norm = float(gn) if gn is not None else float("nan")
        return {"loss": float(loss.detach()), **mets, "grad_norm": grad_norm}

    # --- checkpoints -------------------------------------------------------------------------

    def save(self, directory: str, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state)

    def load(self, directory: str, tag: str) -> dict:
        _, client = self.engine.load_checkpoint(directory, tag=tag)
        self.version = int(client["version"])
        return client
