"""The three GRPO roles as plain classes; orchestrator/grpo.py wraps them with `ray.remote`.

- `RolloutSampler` holds an inference copy of the policy and generates G completions per prompt
  with `model.generate` (MLA latent KV cache). Every `generate` call names the weights it must use
  (an ObjectRef the driver got from the learners, and its version): a sampler that Ray restarted
  after a crash, or one that missed a sync, loads them before sampling, so a retried call samples
  from the same policy as the original would have.
- `RewardWorker` scores one chunk of rollouts with `rl.evaluator.RewardEvaluator` (bounded thread
  pool, per-sample timeouts, live-reloaded reward files).
- `PolicyLearner` is one rank of the learner group: a DeepSpeed engine (ZeRO stage from config)
  over the policy, an optional frozen reference model beside it, old/reference log-probs, and the
  configured epochs of minibatch updates of `rl.grpo.grpo_loss`.

Sample layout shared by the roles: a rollout chunk is a dict of lists, one entry per completion:
`task` (the task row), `group` (index of its prompt in the step), `prompt_ids` (with BOS),
`completion_ids`, `completion` (text), `truncated`, `version` (policy version that sampled it).

Test: `pytest tests/orchestrator/test_orch_grpo.py`.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model import ModelArgs, Transformer


def quiet_teardown_hook(unraisable) -> None:
    """sys.unraisablehook of the reward workers. Ray stops an actor with SIGTERM, whose handler
    raises SystemExit wherever the main thread is; inside a weakref callback Python cannot raise
    it, and a reward worker printed "Exception ignored in ... SystemExit: 1" with a traceback at
    the end of most GRPO runs. That exit is the intended one: it is not printed; anything else
    is, as before."""
    if unraisable.exc_type is SystemExit:
        return
    sys.__unraisablehook__(unraisable)


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict: equal iff bit-identical."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_policy(init_dir: str | Path) -> tuple[Transformer, ModelArgs]:
    from model.hf import from_hf_pretrained

    model = from_hf_pretrained(init_dir)
    return model, model.args


class RolloutSampler:
    def __init__(self, init_dir: str, tokenizer_path: str, *, template: str, threads: int = 1):
        from data.tokenizer import load_tokenizer

        torch.set_num_threads(threads)
        self.tok = load_tokenizer(tokenizer_path)
        self.template = template
        self.model, _ = load_policy(init_dir)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Ray shows a GPU only to GPU samplers
        self.model.to(self.device).eval()
        self.version = 0
        self.loads = 0  # how many times weights were loaded (restarts and syncs)
        self.sync = None  # orchestrator.weight_sync.SyncGroup, with grpo.weight_sync=collective

    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> int:
        self.model.load_state_dict(state, strict=True)
        self.version = version
        self.loads += 1
        return version

    def device_type(self) -> str:
        return self.device.type

    def join_sync_group(self, addr: str, port: int, *, rank: int, world: int, tag: str, meta, backend: str, timeout_s: float) -> bool:
        from orchestrator.weight_sync import SyncGroup

        self.sync = None
        self.sync = SyncGroup(addr, port, rank=rank, world=world, tag=tag, meta=meta, backend=backend, timeout_s=timeout_s)
        return True

    def receive_weights(self, version: int) -> bool:
        """The broadcast from learner rank 0; False (and the group dropped) when there is no group
        (a restarted sampler) or the broadcast failed: the driver then loads from the object store."""
        if self.sync is None:
            return False
        try:
            state = self.sync.receive()
        except Exception as e:  # a peer died or timed out: this group is finished
            print(f"sampler: weight broadcast failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
            self.sync = None
            return False
        with torch.no_grad():
            self.load_weights(state, version)
        return True

    def weights_hash(self) -> str:
        return state_hash(self.model.state_dict())

    def generate(self, tasks: list[dict], groups: list[int], weights: list | None, version: int, *, group_size: int,
                 max_new_tokens: int, temperature: float, top_p: float, seed: int) -> dict[str, Any]:
        """G completions for each task with the policy at `version`; `weights` is `[ObjectRef]` of
        that state (wrapped in a list so that Ray does not fetch it: only a sampler that does not
        hold `version`, after a restart or a missed sync, reads it from the object store)."""
        from data.templates import render_prompt
        from model.generate import generate

        if weights is not None and version != self.version:
            import ray

            self.load_weights(ray.get(weights[0]), version)
        t0 = time.perf_counter()
        prompts = [[self.tok.bos_id] + self.tok.encode(render_prompt(t["prompt"], self.template)) for t in tasks]
        batch = [p for p in prompts for _ in range(group_size)]
        outs = generate(self.model, batch, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        stop_token_ids=[self.tok.answer_end_id, self.tok.eos_id], seed=seed, pad_id=self.tok.pad_id)
        stops = {self.tok.answer_end_id, self.tok.eos_id}
        out: dict[str, list] = {k: [] for k in ("task", "group", "prompt_ids", "completion_ids", "completion", "truncated", "version")}
        for i, ids in enumerate(outs):
            j = i // group_size
            out["task"].append(tasks[j])
            out["group"].append(groups[j])
            out["prompt_ids"].append(batch[i])
            out["completion_ids"].append(ids)
            out["completion"].append(self.tok.decode(ids))
            out["truncated"].append(not ids or ids[-1] not in stops)
            out["version"].append(self.version)
        out["seconds"] = time.perf_counter() - t0
        out["tokens"] = sum(len(x) for x in outs)
        return out


class RewardWorker:
    """Scores a rollout chunk; returns small per-sample records (the driver never sees token ids)."""

    def __init__(self, reward_cfg, *, max_len: int, threads: int = 1):
        from rl.evaluator import RewardEvaluator

        sys.unraisablehook = quiet_teardown_hook
        torch.set_num_threads(threads)
        self.evaluator = RewardEvaluator(reward_cfg)
        self.max_len = max_len
        self.calls = 0

    def score(self, chunk: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        t0 = time.perf_counter()
        samples = [
            {**task, "completion": text, "completion_tokens": len(ids), "max_len": self.max_len}
            for task, text, ids in zip(chunk["task"], chunk["completion"], chunk["completion_ids"])
        ]
        results = self.evaluator.score(samples)
        records = []
        for i, r in enumerate(results):
            think = chunk["completion"][i].split("</think>")[0]
            records.append({
                "id": chunk["task"][i]["id"], "group": chunk["group"][i], "reward": float(r["reward"]),
                "rewards": r["rewards"], "errors": r["errors"], "length": len(chunk["completion_ids"][i]),
                "truncated": bool(chunk["truncated"][i]), "version": chunk["version"][i],
                "reasons": len(think.strip()) > 0,
            })
        return {"records": records, "seconds": time.perf_counter() - t0, "gen_seconds": chunk["seconds"],
                "tokens": chunk["tokens"], "reward_errors": self.evaluator.error_counts()}

    def close(self) -> None:
        """Stop the evaluator's thread pool before the actor is torn down (a pool still alive at
        teardown can print a concurrent.futures traceback from the dying process)."""
        self.evaluator.close()


class _LogProbs(nn.Module):
    """What the DeepSpeed engine wraps: tokens [B, T] -> log p(targets) [B, T]."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model.token_logprobs(tokens, targets)


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


def kept_samples(advantages: list[float | None], chunks: tuple[dict, ...]) -> tuple[list, list, list]:
    """(prompt ids, completion ids, advantages) of the samples that enter the loss, in chunk order:
    those with an advantage (kept groups, not filtered) and a non-empty completion."""
    prompts, completions, adv = [], [], []
    flat = [(p, c) for ch in chunks for p, c in zip(ch["prompt_ids"], ch["completion_ids"])]
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
        model, _ = load_policy(init_dir)
        self.model = _LogProbs(model.eval().requires_grad_(False))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.pad_id, self.batch = pad_id, batch

    @torch.no_grad()
    def logprobs(self, advantages: list[float | None], *chunks: dict) -> list[torch.Tensor]:
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
    """One rank of the learner group; all ranks get the same calls in the same order."""

    def __init__(self, init_dir: str, grpo_cfg, *, rank: int, world: int, master_addr: str, master_port: int,
                 pad_id: int, seed: int, threads: int = 1):
        from orchestrator.ds_config import deepspeed_config, import_deepspeed

        torch.set_num_threads(threads)
        os.environ.update({"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
                           "WORLD_SIZE": str(world), "LOCAL_RANK": "0"})  # Ray shows each learner only its own GPU
        deepspeed = import_deepspeed()
        on_gpu = torch.cuda.is_available()
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)
        self.cfg, self.rank, self.world, self.pad_id = grpo_cfg, rank, world, pad_id
        torch.manual_seed(seed)
        model, self.args = load_policy(init_dir)
        self.ref = None
        if grpo_cfg.kl_beta > 0 and grpo_cfg.reference == "colocated":
            self.ref, _ = load_policy(init_dir)
            self.ref.eval().requires_grad_(False)
        micro = max(1, grpo_cfg.minibatch_size // world)
        ds_cfg = deepspeed_config(
            micro_batch_size=micro, grad_accum=1, world_size=world, zero_stage=grpo_cfg.zero_stage, lr=grpo_cfg.lr,
            betas=(0.9, 0.99), weight_decay=0.0, grad_clip=grpo_cfg.grad_clip, bf16=on_gpu,
        )
        self.engine, *_ = deepspeed.initialize(model=_LogProbs(model), model_parameters=model.parameters(), config=ds_cfg)
        self.device = self.engine.device
        self.version = 0
        self.sync = None  # orchestrator.weight_sync.SyncGroup on rank 0, with grpo.weight_sync=collective

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

    def weights(self) -> tuple[int, dict[str, torch.Tensor] | None]:
        return self.version, self.state_dict()

    def weights_meta(self):
        """Names, shapes and dtypes of the policy state, in the order a collective sync packs them (rank 0)."""
        from orchestrator.weight_sync import weights_meta

        s = self.state_dict()
        return weights_meta(s) if s is not None else None

    def device_type(self) -> str:
        return self.device.type

    def join_sync_group(self, addr: str, port: int, *, tag: str, world: int, meta, backend: str, timeout_s: float) -> bool:
        from orchestrator.weight_sync import SyncGroup

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

    def _logprobs(self, module, tokens, targets, grad: bool):
        with torch.set_grad_enabled(grad):
            return module(tokens.to(self.device), targets.to(self.device)).float()

    @torch.no_grad()
    def _entropy(self, tokens, targets, mask) -> float:
        logits = self.engine.module.model(tokens.to(self.device)).float()
        logp = torch.log_softmax(logits, -1)
        ent = -(logp.exp() * logp).sum(-1)
        m = mask.to(ent.device)
        return float((ent * m).sum() / m.sum().clamp(min=1))

    def train(self, advantages: list[float | None], step: int, *chunks: dict, reference: list[torch.Tensor] | None = None) -> dict:
        """GRPO update on this rank's share of the step's samples.

        `chunks` are the sampler outputs (Ray resolves the ObjectRefs the driver passed), `advantages`
        one value per sample in chunk order; samples with advantage None (dropped groups, filtered
        overlong completions) are left out of the loss. `reference`: the reference actor's
        log-probs of the kept samples (`ReferenceModel.logprobs`), when it is not colocated.
        """
        from rl.grpo import grpo_loss

        cfg = self.cfg
        t0 = time.perf_counter()
        prompts, completions, adv = kept_samples(advantages, chunks)
        n = len(adv)
        mine = list(range(self.rank, n, self.world))  # this rank's share, interleaved
        # every rank must take the same number of optimizer steps: minibatches are global
        minibatch = max(self.world, min(cfg.minibatch_size, n))
        n_mb = max(1, -(-n // minibatch))
        metrics: dict[str, float] = {}
        if not mine:
            return {"samples": 0}
        tokens, targets, mask = pack_batch([prompts[i] for i in mine], [completions[i] for i in mine], self.pad_id)
        adv_t = torch.tensor([adv[i] for i in mine], dtype=torch.float32)
        module = self.engine.module
        module.eval()  # no dropout anywhere; MoE routing is the same in both modes
        old = self._logprobs(module, tokens, targets, grad=False)
        ref = self._logprobs(_LogProbs(self.ref), tokens, targets, grad=False) if self.ref is not None else None
        if reference is not None:
            ref = _stack_rows([reference[i] for i in mine], targets.shape[1])
        metrics["entropy"] = self._entropy(tokens, targets, mask)
        sums: dict[str, float] = {}
        grad_norms: list[float] = []
        updates = 0
        g = torch.Generator().manual_seed(step)
        for _ in range(cfg.epochs):
            order = torch.randperm(len(mine), generator=g)
            per_mb = -(-len(mine) // n_mb)
            for k in range(n_mb):
                idx = order[k * per_mb : (k + 1) * per_mb]
                if len(idx) == 0:  # keep the collective calls in step across ranks
                    idx = order[:1]
                m = mask[idx].to(self.device)
                logp = self.engine(tokens[idx].to(self.device), targets[idx].to(self.device)).float()
                loss, mets = grpo_loss(
                    logp, old[idx].to(self.device), ref[idx].to(self.device) if ref is not None else None, adv_t[idx].to(self.device), m,
                    clip_low=cfg.clip_low, clip_high=cfg.clip_high, kl_beta=cfg.kl_beta, aggregation=cfg.aggregation,
                )
                if cfg.aggregation == "token" and self.world > 1:
                    # DeepSpeed averages gradients over ranks: rescale so the update is the mean over
                    # all valid tokens of the global minibatch, not a mean of per-rank means.
                    local = m.sum()
                    total = local.detach().clone()
                    dist.all_reduce(total)
                    loss = loss * local * self.world / total.clamp(min=1)
                self.engine.backward(loss)
                if cfg.zero_stage == 0:  # DeepSpeed records the norm only inside its ZeRO optimizers
                    norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
                    grad_norms.append(float(torch.stack(norms).norm()) if norms else 0.0)
                self.engine.step()
                if cfg.zero_stage > 0:
                    gn = self.engine.get_global_grad_norm()
                    grad_norms.append(float(gn) if gn is not None else float("nan"))
                updates += 1
                for key, v in {"loss": float(loss.detach()), **mets}.items():
                    sums[key] = sums.get(key, 0.0) + v
        metrics.update({k: v / max(1, updates) for k, v in sums.items()})
        metrics["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")  # before clipping
        metrics["updates"] = updates
        metrics["samples"] = len(mine)
        metrics["learn_seconds"] = time.perf_counter() - t0
        self.version += 1
        return metrics

    # --- checkpoints -------------------------------------------------------------------------

    def save(self, directory: str, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state)

    def load(self, directory: str, tag: str) -> dict:
        _, client = self.engine.load_checkpoint(directory, tag=tag)
        self.version = int(client["version"])
        return client
