"""The policy learner: one rank of a DeepSpeed group that applies the GRPO update, and the frozen
reference model (colocated with each learner — partitioned over them under ZeRO-3 —, or in an actor of its own with
`grpo.reference=actor`).

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

Expert parallelism (`grpo.expert_parallel=K`, issue 21): each rank loads and owns E/K routed
experts per MoE layer (orchestrator/expert_shard.py, as pretraining does): their weights, gradients
and AdamW state, reduced over the ranks that own the same experts, clipped with DeepSpeed's global
norm; the rest stays with DeepSpeed. Every rank then runs the same number of forward passes (the
all-to-all), the published state gathers the experts from their owners, and a checkpoint holds
each rank's piece of them in its tag folder.

Test: `pytest tests/orchestrator/test_orch_grpo.py tests/orchestrator/test_orch_learner.py`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from orchestrator.grpo.batch import LogProbs, behaviour_rows, behaviour_terms, expert_rows, kept_behaviour, kept_samples, pack_batch, replay_experts, stack_rows
from orchestrator.grpo.rollout import RolloutChunk, compute_dtype, load_policy, state_hash
from orchestrator.grpo.update import MinibatchUpdates

LAYOUT = "learners.json"  # beside a checkpoint's DeepSpeed files: the learners' count, ZeRO stage and EP degree


class ReferenceModel:
    """The frozen reference policy in its own actor (`grpo.reference=actor`): the learners get its
    log-probs of the step's samples instead of holding a second model each."""

    def __init__(self, init_dir: str, *, pad_id: int, threads: int = 1, batch: int = 64):
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = compute_dtype("auto", self.device)  # as the learners compute (DeepSpeed's bf16 on GPUs)
        self.model = LogProbs(load_policy(init_dir, dtype=dtype).eval().requires_grad_(False)).to(self.device)
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


def build_policy(init_dir: str, g, *, rank: int, world: int, exact: bool, on_gpu: bool):
    """(the policy this rank trains, its ExpertShard or None, the DeepSpeed config). Each rank
    materialises only what it owns: under ZeRO-3 the model is built partitioned and filled one
    parameter at a time (issue 19); with grpo.expert_parallel only this rank's experts are read."""
    from orchestrator.ds_config import deepspeed_config

    def config(n_params: int) -> dict:
        return deepspeed_config(
            micro_batch_size=max(1, g.minibatch_size // world), grad_accum=1, world_size=world, zero_stage=g.zero_stage,
            lr=g.lr, betas=tuple(g.betas), weight_decay=g.weight_decay, grad_clip=g.grad_clip, bf16=on_gpu, n_params=n_params)

    def checkpointed(model):
        if g.activation_checkpointing:
            from model.parallel import apply_activation_checkpointing

            apply_activation_checkpointing(model)
        return model

    ep = g.expert_parallel
    if g.zero_stage == 3 and ep == 1:
        from model.hf import from_hf_pretrained_zero3, hf_model_args
        from model.transformer import Transformer

        with torch.device("meta"):
            n_params = sum(q.numel() for q in Transformer(hf_model_args(init_dir)).parameters())
        ds_cfg = config(n_params)
        return checkpointed(from_hf_pretrained_zero3(init_dir, ds_cfg)), None, ds_cfg
    model = checkpointed(load_policy(init_dir, experts=(rank % ep, ep) if ep > 1 else None).set_exact(exact))  # this rank's experts only
    experts = None
    if ep > 1:
        from orchestrator.expert_shard import ExpertShard

        experts = ExpertShard(model, ep=ep, rank=rank, world=world, lr=g.lr, betas=tuple(g.betas), weight_decay=g.weight_decay,
                              grad_clip=g.grad_clip, dtype=torch.bfloat16 if on_gpu else torch.float32)  # DeepSpeed runs bf16 on GPUs
    return model, experts, config(sum(q.numel() for q in model.parameters()))  # owned experts are no longer parameters


def held_bytes(module: torch.nn.Module) -> int:
    """Bytes of `module`'s parameters held by this rank (a ZeRO-3 parameter: its partition)."""
    return sum((q.ds_tensor if hasattr(q, "ds_tensor") else q).numel() * q.element_size() for q in module.parameters())


def build_reference(init_dir: str, g, ds_cfg: dict, device: torch.device):
    """The frozen reference colocated with a learner rank (grpo.reference=colocated). Under ZeRO-3
    without owned experts it is partitioned over the learners as the policy is: built under zero.Init
    and run by a DeepSpeed engine without an optimizer, which gathers each layer for its forward (as
    OpenRLHF runs its reference), so a rank holds 1/learners of it. Otherwise each rank holds a whole
    copy, in the policy's compute dtype (bf16 on GPUs). Every rank calls it the same number of times
    under ZeRO-3 (`train` calls it once per step on every rank)."""
    if g.zero_stage == 3 and g.expert_parallel == 1:
        from model.hf import from_hf_pretrained_zero3
        from orchestrator.ds_config import import_deepspeed

        cfg = {k: v for k, v in ds_cfg.items() if k not in ("optimizer", "gradient_clipping")}
        model = from_hf_pretrained_zero3(init_dir, cfg).eval().requires_grad_(False)
        engine, *_ = import_deepspeed().initialize(model=LogProbs(model), config=cfg)
        return engine
    dtype = compute_dtype("auto", device)  # read in bf16 on GPUs: no fp32 copy on the way
    return LogProbs(load_policy(init_dir, dtype=dtype).eval().requires_grad_(False)).to(device)


class PolicyLearner(MinibatchUpdates):
    """One rank of the learner group; all ranks get the same calls in the same order.

    `grpo_cfg` is the `grpo:` section; `max_new_tokens` the generation budget (the constant of
    `grpo.aggregation=constant`); `threads` the torch threads of the actor, `train_threads` those
    of an update (None: the same)."""

    def __init__(self, init_dir: str, grpo_cfg, *, rank: int, world: int, master_addr: str, master_port: int,
                 pad_id: int, seed: int, max_new_tokens: int, threads: int = 1, train_threads: int | None = None,
                 exact: bool = False):
        from orchestrator.ds_config import import_deepspeed

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
        model, self.experts, ds_cfg = build_policy(init_dir, grpo_cfg, rank=rank, world=world, exact=exact, on_gpu=on_gpu)
        if grpo_cfg.compile:  # the trunk and the log-prob head as graphs (issue 24); the engine wraps the same module
            from model.parallel import apply_compile

            apply_compile(model, ("token_logprobs", "hidden"), backend=grpo_cfg.compile_backend)
        self.engine, *_ = deepspeed.initialize(model=LogProbs(model), model_parameters=model.parameters(), config=ds_cfg)
        if self.experts is not None:
            self.experts.hook_global_norm(self.engine)
        self.device = self.engine.device
        self.ref = None
        if grpo_cfg.kl_beta > 0 and grpo_cfg.reference == "colocated":
            self.ref = build_reference(init_dir, grpo_cfg, ds_cfg, self.device)
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
        if self.experts is not None:  # owned experts, from every member of the EP group
            state.update({k: v.cpu() for k, v in self.experts.gathered().items()})
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

    def held_bytes(self) -> dict[str, int]:
        """Bytes of parameters this rank holds, the policy's and the colocated reference's (ZeRO-3: partitions)."""
        return {"policy": held_bytes(self.engine.module), "reference": held_bytes(self.ref) if self.ref is not None else 0}

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
        if not adv:  # no update, but the driver publishes the next version all the same
            self.version += 1
            return {"samples": 0}
        filler = not mine  # fewer samples than ranks: this rank runs every collective on a weightless row
        if filler:
            mine = [0]
        my_prompts, my_completions = [prompts[i] for i in mine], [completions[i] for i in mine]
        tokens, targets, mask = pack_batch(my_prompts, my_completions, self.pad_id)
        (B, width), model = targets.shape, self.engine.module.model
        K, L = model.args.n_activated_experts, len(model.main_moe_layers())
        batch = {"tokens": tokens, "targets": targets, "mask": mask, "adv": torch.tensor([adv[i] for i in mine], dtype=torch.float32),
                 "old": torch.zeros(B, width)}
        beh = {k: ([v[i] for i in mine] if isinstance(v, list) else v) for k, v in kept_behaviour(advantages, chunks).items()}
        if self.cfg.router_replay and beh["experts"] is not None and L:
            batch["replay"] = expert_rows(beh["experts"], width, K)
        if beh["logprobs"] is not None:
            batch["sampler"] = behaviour_rows(my_prompts, beh["logprobs"], width)
        elif self.cfg.importance != "none":
            raise ValueError("grpo.importance needs the samplers' log-probs, and these rollout chunks carry none")
        # what the policy measures before this step's first update, per row: its entropy, its
        # log-probs at the sampling temperature (the mismatch meter, importance weights), its experts
        seen = {"entropy": torch.zeros(B, width), "logp_t": torch.zeros(B, width), "routed": torch.zeros(L, B, width, K, dtype=torch.long),
                "temperature": beh["temperature"]}
        lengths = [len(p) + len(c) - 1 for p, c in zip(my_prompts, my_completions)]
        plan = self._minibatches(0 if filler else B, n_total=len(adv), step=step)
        first = set(plan[0][0].tolist())
        rest = [b for b in range(B) if b not in first]
        if not rest and self._lockstep():
            rest = [0]  # keep the ranks' calls in step
        self.engine.module.eval()  # no dropout anywhere; MoE routing is the same in both modes
        with torch.no_grad():
            for rows in self._micro_batches(rest, lengths):
                w = max(lengths[r] for r in rows)
                with model.routing_replay(replay_experts({k: batch[k][rows][..., :w, :] for k in ("replay",) if k in batch})):
                    old, entropy, logp_t = self.engine.module.measure(tokens[rows, :w].to(self.device), targets[rows, :w].to(self.device),
                                                                        seen["temperature"])
                    self._record(batch, seen, rows, w, old, entropy, logp_t)
            if self.ref is not None:
                batch["ref"] = self.ref(tokens.to(self.device), targets.to(self.device)).float().cpu()
        if reference is not None:
            batch["ref"] = stack_rows([reference[i] for i in mine], width)
        metrics = self._epochs(batch, plan, seen, lengths)
        entropy_mean = float((seen["entropy"] * mask).sum() / mask.sum().clamp(min=1))
        lag = torch.tensor([self.version - v for v in beh["versions"]], dtype=torch.float32)
        extra, _ = behaviour_terms(self.cfg, seen["logp_t"], seen["routed"], mask, my_prompts, beh, lag)
        metrics.update({"entropy": entropy_mean, "samples": 0 if filler else len(mine), "learn_seconds": time.perf_counter() - t0, **extra})
        self.version += 1
        return metrics

    # --- checkpoints -------------------------------------------------------------------------

    def save(self, directory: str, tag: str, client_state: dict) -> None:
        """DeepSpeed's files, the owned experts' parts, and (rank 0) the layout they were saved in."""
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state)
        if self.experts is not None:
            self.experts.save(Path(directory) / tag)
        if self.rank == 0:
            meta = {"tag": tag, "world_size": self.world, "zero_stage": self.engine.zero_optimization_stage(),
                    "expert_parallel": self.experts.ep if self.experts is not None else 1}
            (Path(directory) / tag / LAYOUT).write_text(json.dumps(meta))

    def load(self, directory: str, tag: str, version: int | None = None) -> None:
        """Restore the policy and optimizer saved under `tag`: by DeepSpeed where the learners'
        count, ZeRO stage and expert layout are the saved ones, else resharded (orchestrator/reshard.py:
        weights and AdamW moments merged from every saved rank, this rank's share set)."""
        from orchestrator.expert_shard import expert_layout
        from orchestrator.reshard import load_resharded, needs_reshard

        at = Path(directory) / tag
        meta = json.loads((at / LAYOUT).read_text()) if (at / LAYOUT).is_file() else None
        if meta is not None and needs_reshard(meta, self.engine, self.world, self.experts, owned=expert_layout(at) is not None):
            if version is None:
                raise ValueError(f"resharding {at}: the policy version must be given")
            load_resharded(self.engine, Path(directory), meta, world=self.world, experts=self.experts, job="grpo", experts_at=at)
            self.version = version
            return
        _, client = self.engine.load_checkpoint(directory, tag=tag)
        if self.experts is not None:
            self.experts.load(at)
        self.version = int(client["version"])
