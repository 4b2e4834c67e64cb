"""The rollout roles, and the driver's handle on them.

- `RolloutSampler` holds an inference copy of the policy (in `rollout.dtype`: by default bf16 on a
  GPU, as the learners compute, fp32 on CPU) and generates G completions per prompt
  with `model.generate` (MLA latent KV cache). With `rollout.expert_parallel=K` the samplers form
  groups of K that hold one copy each, the routed experts split K ways (issue 21): each member
  loads only its experts, every member of a group gets the same calls, decodes its share of the
  rows and exchanges tokens with the others all-to-all (model/generate.py), and member 0 returns
  the chunk. Weights reach each member as its own shard (weight_sync.py). A process group cannot
  take in a replacement member, so when one member fails the driver restarts the whole group (all
  K members, a fresh rendezvous) and runs its unfinished chunks again (`Rollouts.results`). Every
  `generate` call names the weights it must use
  (an ObjectRef the driver got from the learners, and its version): a sampler that Ray restarted
  after a crash, or one that missed a sync, loads them before sampling, so a retried call samples
  from the same policy as the original would have. With each completion it returns what the
  learner compares itself against (issue 20): per token the log-prob under the distribution it
  was sampled from, and per input position the routed experts of every MoE layer; with
  `rollout.exact` it decodes in the batch-invariant mode (model/exact.py).
- `RewardWorker` scores one `RolloutChunk` with `rl.evaluator.RewardEvaluator` (bounded thread pool,
  per-sample timeouts, live-reloaded reward files) and returns `rl.rollouts.ScoredRollout` records:
  the driver never sees token ids.
- `Rollouts` is the driver's side: it starts the samplers and reward workers in their placement
  bundles (restarted after a crash, calls retried; expert-parallel groups restarted whole, their
  chunks resubmitted with the same seeds) and submits tasks to them, two chunks per sampler so that
  scoring one chunk overlaps generating the next. `launch` returns ObjectRefs; `results` waits.

The classes work without Ray (tests and benchmarks call them in-process); `Rollouts` wraps them.

Test: `pytest tests/orchestrator/test_orch_grpo.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rl.rollouts import ScoredRollout


def quiet_teardown_hook(unraisable) -> None:
    """sys.unraisablehook of the reward workers. Ray stops an actor with SIGTERM, whose handler
    raises SystemExit wherever the main thread is; inside a weakref callback Python cannot raise
    it and prints "Exception ignored in ... SystemExit: 1" with a traceback. That exit is the
    intended one: it is not printed; anything else is."""
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


def load_policy(init_dir: str | Path, experts: tuple[int, int] | None = None, dtype: torch.dtype = torch.float32):
    from model.hf import from_hf_pretrained

    return from_hf_pretrained(init_dir, experts=experts, dtype=dtype)


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """rollout.dtype on `device`: "auto" is the learners' compute dtype, bf16 on a GPU (DeepSpeed's
    bf16 mode) and fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


@dataclasses.dataclass
class RolloutChunk:
    """One sampler call's output: one entry per completion, G consecutive entries per task."""

    tasks: list[dict]  # the task row of each completion
    groups: list[int]  # index of its prompt in the step
    prompt_ids: list[list[int]]  # with BOS
    completion_ids: list[list[int]]
    completions: list[str]  # decoded
    truncated: list[bool]  # stopped by the token budget
    versions: list[int]  # policy version that sampled it
    seconds: float  # generation time
    tokens: int  # completion tokens generated
    # behaviour (issue 20): log-prob of each completion token under the sampling distribution
    # ([len(completion)] fp32), routed experts per input position ([L, len(prompt) + len(completion) - 1, K]
    # uint8/int16), and the sampling settings they hold for; None where a chunk was not sampled here
    logprobs: list[torch.Tensor] | None = None
    experts: list[torch.Tensor] | None = None
    temperature: float = 1.0
    top_p: float = 1.0


@dataclasses.dataclass
class ScoredChunk:
    """A reward worker's answer for one chunk."""

    records: list[ScoredRollout]
    seconds: float  # scoring time
    gen_seconds: float  # the chunk's generation time
    tokens: int
    reward_errors: dict[str, int]  # errors per reward in this call


class RolloutSampler:
    def __init__(self, init_dir: str, tokenizer_path: str, *, template: str, threads: int = 1, exact: bool = False,
                 expert_group: tuple[str, int, int, int] | None = None, group_timeout_s: float = 600.0,
                 static_decode: bool | None = None, dtype: str = "auto"):
        """expert_group=(addr, port, rank, K): member `rank` of an expert-parallel sampler group whose
        store member 0 hosts at addr:port (the constructor returns once all K have joined).
        static_decode (rollout.static_decode): True samples through one StaticDecoder kept for the
        actor's life (model/static_decode.py: fixed shapes, a CUDA graph per step shape on CUDA, its
        buffers and graphs reused by every step, weight syncs copied in place); None does so on
        CUDA without exact mode or an expert group; False never. dtype (rollout.dtype): of the
        weights and the compute ("auto": bf16 on a GPU, fp32 on CPU); weights loaded later are cast to it."""
        from data.tokenizer import load_tokenizer

        torch.set_num_threads(threads)
        self.tok = load_tokenizer(tokenizer_path)
        self.template = template
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Ray shows a GPU only to GPU samplers
        self.group, self.ep_rank, self.dtype = None, 0, compute_dtype(dtype, self.device)
        if expert_group is None:
            self.model = load_policy(init_dir, dtype=self.dtype).set_exact(exact)
        else:
            import datetime

            import torch.distributed as dist
            from model.parallel import apply_expert_parallel

            addr, port, self.ep_rank, k = expert_group
            self.model = load_policy(init_dir, experts=(self.ep_rank, k), dtype=self.dtype)  # this member's experts only
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", init_method=f"tcp://{addr}:{port}",
                                    rank=self.ep_rank, world_size=k, timeout=datetime.timedelta(seconds=group_timeout_s))
            self.group = dist.group.WORLD
            apply_expert_parallel(self.model, self.group, shard_weights=True)
        self.model.to(self.device).eval()
        if static_decode and (exact or self.group is not None):
            raise ValueError("static decoding runs without exact mode and without an expert-parallel group")
        self.static = static_decode or (static_decode is None and self.device.type == "cuda" and not exact
                                        and self.group is None)
        self.decoder = None  # the StaticDecoder, made by the first call that needs it (and remade larger if one does)
        self.version = 0
        self.loads = 0  # how many times weights were loaded (restarts and syncs)
        self.sync = None  # weight_sync.SyncGroup, with grpo.weight_sync=collective

    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> int:
        self.model.load_state_dict(state, strict=True)
        self.version = version
        self.loads += 1
        return version

    def device_type(self) -> str:
        return self.device.type

    def join_sync_group(self, addr: str, port: int, *, rank: int, world: int, tag: str, meta, backend: str, timeout_s: float) -> bool:
        from orchestrator.grpo.weight_sync import SyncGroup

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

    def _decoder(self, batch: list[list[int]], max_new_tokens: int):
        """The actor's StaticDecoder, made (again) when this call needs more rows or slots than it
        holds: rows for the batch, slots for the longest prompt rounded up to 64 plus the budget, so
        that prompts of varying length reuse one decoder and its graphs."""
        from model.static_decode import StaticDecoder

        rows, max_len = len(batch), min(self.model.args.max_seq_len, -(-max(map(len, batch)) // 64) * 64 + max_new_tokens)
        d = self.decoder
        if d is None or d.rows < rows or d.max_len < max(map(len, batch)) + max_new_tokens:
            self.decoder = None  # its buffers go before the new ones come
            self.decoder = StaticDecoder(self.model, rows=max(rows, d.rows if d else 0), max_len=max(max_len, d.max_len if d else 0))
        return self.decoder

    def weights_hash(self) -> str:
        return state_hash(self.model.state_dict())

    def generate(self, tasks: list[dict], groups: list[int], weights: list | None, version: int, *, group_size: int,
                 max_new_tokens: int, temperature: float, top_p: float, seed: int) -> RolloutChunk | None:
        """G completions for each task with the policy at `version`; `weights` is `[ObjectRef]` of
        that state (wrapped in a list so that Ray does not fetch it: only a sampler that does not
        hold `version`, after a restart or a missed sync, reads it from the object store)."""
        from model.generate import sample

        if weights is not None and version != self.version:
            from orchestrator.one_process import Ref

            if isinstance(weights[0], Ref):  # grpo.runtime=one_process
                self.load_weights(weights[0].value(), version)
            else:
                import ray

                self.load_weights(ray.get(weights[0]), version)
        t0 = time.perf_counter()
        prompts = [self.tok.prompt_ids(t["prompt"], self.template) for t in tasks]  # ours: BOS + template; HF: its chat template
        batch = [p for p in prompts for _ in range(group_size)]
        stops = self.tok.stop_ids
        gen = sample(self.model, batch, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     stop_token_ids=stops, seed=seed, pad_id=self.tok.pad_id, group=self.group,
                     decoder=self._decoder(batch, max_new_tokens) if self.static else None)
        if self.ep_rank:
            return None  # every member holds the group's output; member 0 returns it
        outs = gen.tokens
        return RolloutChunk(
            tasks=[tasks[i // group_size] for i in range(len(outs))], groups=[groups[i // group_size] for i in range(len(outs))],
            prompt_ids=batch, completion_ids=outs, completions=[self.tok.decode(ids) for ids in outs],
            truncated=[not ids or ids[-1] not in stops for ids in outs], versions=[self.version] * len(outs),
            seconds=time.perf_counter() - t0, tokens=sum(len(x) for x in outs), logprobs=gen.logprobs, experts=gen.experts,
            temperature=temperature, top_p=top_p)


class RewardWorker:
    """Scores rollout chunks; returns small typed records.

    A completion is correct when its task kind's accuracy reward (rl.rollouts.ACCURACY_REWARD)
    scores 1 as the evaluator computes it, second opinion included: from the configured rewards
    when that reward is among them, else from a second evaluator holding only that reward (the
    held-out evaluation of code tasks in an arithmetic run, say)."""

    def __init__(self, reward_cfg, *, max_len: int, threads: int = 1):
        from rl.evaluator import RewardEvaluator

        sys.unraisablehook = quiet_teardown_hook
        torch.set_num_threads(threads)
        self.cfg = reward_cfg
        self.evaluator = RewardEvaluator(reward_cfg)  # raises (one line) where the sandbox cannot isolate
        self.verifiers: dict[str, RewardEvaluator] = {}
        self.max_len = max_len

    def _verdicts(self, name: str, samples: list[dict], results: list[dict]) -> list[tuple[bool, str | None]]:
        """(correct, second opinion) per sample by the accuracy reward `name`."""
        if any(s.name == name for s in self.cfg.rewards):
            return [(r["rewards"].get(name, 0.0) >= 1.0, r.get("second_opinion")) for r in results]
        if name not in self.verifiers:
            from rl.evaluator import RewardEvaluator
            from rl.rewards import RewardSpec

            self.verifiers[name] = RewardEvaluator(dataclasses.replace(self.cfg, rewards=[RewardSpec(name, 1.0)]))
        return [(r["reward"] >= 1.0, r.get("second_opinion")) for r in self.verifiers[name].score(samples)]

    def score(self, chunk: RolloutChunk) -> ScoredChunk:
        from rl.rollouts import accuracy_reward, reasons

        t0 = time.perf_counter()
        samples = [{**task, "completion": text, "completion_tokens": len(ids), "max_len": self.max_len}
                   for task, text, ids in zip(chunk.tasks, chunk.completions, chunk.completion_ids)]
        results = self.evaluator.score(samples)
        verdicts: list = [None] * len(samples)
        by_reward: dict[str, list[int]] = {}
        for i, task in enumerate(chunk.tasks):
            by_reward.setdefault(accuracy_reward(task), []).append(i)
        for name, idx in by_reward.items():
            for i, v in zip(idx, self._verdicts(name, [samples[i] for i in idx], [results[i] for i in idx])):
                verdicts[i] = v
        records = [ScoredRollout(
            id=task["id"], group=chunk.groups[i], reward=float(r["reward"]), rewards=r["rewards"], errors=r["errors"],
            correct=bool(verdicts[i][0]), length=len(chunk.completion_ids[i]), truncated=bool(chunk.truncated[i]),
            version=chunk.versions[i], reasons=reasons(chunk.completions[i]), second_opinion=verdicts[i][1])
            for i, (task, r) in enumerate(zip(chunk.tasks, results))]
        errors = self.evaluator.error_counts_since_last_call()
        for v in self.verifiers.values():
            for k, n in v.error_counts_since_last_call().items():
                errors[k] = errors.get(k, 0) + n
        return ScoredChunk(records=records, seconds=time.perf_counter() - t0, gen_seconds=chunk.seconds, tokens=chunk.tokens,
                           reward_errors=errors)

    def close(self) -> None:
        """Stop the evaluators' pools and reward processes before the actor is torn down (a pool still
        alive at teardown can print a concurrent.futures traceback from the dying process)."""
        for ev in [self.evaluator, *self.verifiers.values()]:
            ev.close()


class Rollouts:
    """The samplers and reward workers of a run, in their placement bundles."""

    def __init__(self, ray, placement, *, hf_dir: Path, tok_path: Path, template: str, rewards, rollout_cfg,
                 num_evaluators: int, seed: int):
        self.ray, self.cfg, self.seed = ray, rollout_cfg, seed
        # Samplers and reward workers come back after a crash (into their bundle, rescheduled if
        # their node died) and their calls are retried. An expert-parallel group cannot take a new
        # member into its process group: `results` restarts the whole group and reruns its chunks.
        restart = dict(max_restarts=-1, max_task_retries=-1)
        K = self.ep = rollout_cfg.expert_parallel
        self.placement, self.max_group_restarts = placement, 2
        self.Sampler = ray.remote(**(restart if K == 1 else dict(max_restarts=0)))(RolloutSampler)
        self.sampler_kw = dict(template=template, exact=rollout_cfg.exact, static_decode=rollout_cfg.static_decode,
                               dtype=rollout_cfg.dtype)
        self.paths = (str(hf_dir), str(tok_path))
        Scorer = ray.remote(**restart)(RewardWorker)
        self.samplers = [s for g in range(rollout_cfg.num_samplers // K) for s in self._start_group(g)]
        self.followers: dict = {}  # calls to members 1.. of expert-parallel groups (they return None): ref -> its chunk's gen ref
        self.chunks: dict = {}  # expert-parallel groups: gen ref -> (group, its epoch, the call's arguments, scorer), until its results are in
        self.epochs = [0] * (rollout_cfg.num_samplers // K)  # restarts of each model copy's members
        self.scorers = [Scorer.options(**placement.options("evaluator", i)).remote(rewards, max_len=rollout_cfg.max_new_tokens)
                        for i in range(num_evaluators)]
        self._check_started()

    def _start_group(self, g: int) -> list:
        """Start model copy `g`'s samplers: one, or the K members of an expert-parallel group (a fresh
        rendezvous on member 0's node)."""
        K = self.ep
        if K == 1:
            return [self.Sampler.options(**self.placement.options("sampler", g)).remote(*self.paths, **self.sampler_kw)]
        from orchestrator.grpo.weight_sync import rendezvous_at

        addr, port = rendezvous_at(self.ray, self.placement, "sampler", g * K)
        return [self.Sampler.options(**self.placement.options("sampler", i)).remote(
            *self.paths, **self.sampler_kw, expert_group=(addr, port, i % K, K)) for i in range(g * K, (g + 1) * K)]

    def _check_started(self) -> None:
        """A reward worker that refuses to start (a node that cannot isolate the code sandbox) is a
        user-fixable error: its one line, as a ConfigError, before any step runs."""
        from orchestrator.config import ConfigError

        try:
            self.ray.get([s.__ray_ready__.remote() for s in self.scorers])
        except self.ray.exceptions.RayActorError as e:
            cause = getattr(e, "cause", None) or e
            lines = [l for l in str(cause).splitlines() if "Error:" in l] or [str(cause).splitlines()[-1]]
            raise ConfigError(f"the reward workers could not start: {lines[-1].split('Error: ', 1)[-1]}") from None

    def launch(self, tasks: list[dict], *, seed_key: tuple[int, ...], group_size: int, temperature: float,
               weights=None, version: int = 0, first_group: int = 0) -> tuple[list, list]:
        """Submit generation + scoring for `tasks`; returns (RolloutChunk refs, ScoredChunk refs), no waiting.
        `weights`: ObjectRef of the policy state at `version` (None: the init checkpoint), or with
        expert-parallel samplers one per expert part (WeightSync.sampler_weights)."""
        S = len(self.samplers) // self.ep  # S model copies of K = rollout.expert_parallel samplers each
        per = max(1, math.ceil(len(tasks) / (S * 2)))  # two chunks per sampler: scoring overlaps generation
        gen, score = [], []
        for c, lo in enumerate(range(0, len(tasks), per)):
            chunk = tasks[lo : lo + per]
            seed = int(np.random.default_rng([self.seed, *seed_key, c]).integers(2**31))
            kw = dict(group_size=group_size, max_new_tokens=self.cfg.max_new_tokens, temperature=temperature, top_p=self.cfg.top_p, seed=seed)
            groups = list(range(first_group + lo, first_group + lo + len(chunk)))
            g, s = self._submit(c % S, (chunk, groups, weights, version, kw), scorer=c)
            gen.append(g)
            score.append(s)
        return gen, score

    def _submit(self, g: int, call: tuple, scorer: int):
        """One chunk's generate call (`call`: its tasks, groups, weights, version and sampling
        arguments) on model copy `g`, every member of its group, and its scoring."""
        K, (chunk, groups, weights, version, kw) = self.ep, call
        refs = [member.generate.remote(chunk, groups, None if weights is None else [weights[r] if isinstance(weights, list) else weights],
                                       version, **kw)
                for r, member in enumerate(self.samplers[g * K : (g + 1) * K])]
        if K > 1:
            self.chunks[refs[0]] = (g, self.epochs[g], call, scorer)
            self.followers.update({f: refs[0] for f in refs[1:]})
        return refs[0], self.scorers[scorer % len(self.scorers)].score.remote(refs[0])

    def results(self, gen: list, scored: list) -> tuple[list, list]:
        """Wait for launched chunks: (their RolloutChunk refs, their ScoredChunks). Where a member of
        an expert-parallel group failed (its own call, or member 0's), the group is restarted — all K,
        a fresh rendezvous, the weights each call names loaded from the object store — and its
        unfinished chunks run again with their seeds: the same completions as without the failure.
        A group that fails more than `max_group_restarts` times within one call raises its error."""
        if self.ep == 1:
            return list(gen), self.ray.get(list(scored))
        errors = (self.ray.exceptions.RayActorError, self.ray.exceptions.RayTaskError)
        gen, scored, values, tries = list(gen), list(scored), [None] * len(scored), {}
        while any(v is None for v in values):
            index = {ref: i for i, ref in enumerate(scored) if values[i] is None}
            mine = {f: gen.index(c) for f, c in self.followers.items() if c in gen}
            [ref], _ = self.ray.wait([*index, *(f for f, i in mine.items() if values[i] is None)], num_returns=1)
            i = index.get(ref, mine.get(ref))
            try:
                value = self.ray.get(ref)
            except errors as e:
                if ref in index and self._generated(gen[i]):
                    raise  # the scorer's own error, not the samplers'
                g, epoch, _, _ = self.chunks[gen[i]]
                if epoch == self.epochs[g]:  # else a chunk of members already replaced: only run it again
                    tries[g] = tries.get(g, 0) + 1
                    if tries[g] > self.max_group_restarts:
                        raise
                    self._restart_group(g, e)
                for j, ref_j in enumerate(gen):  # the group's unfinished chunks, again on its new members
                    if values[j] is None and self.chunks[ref_j][0] == g:
                        _, _, call, scorer = self.chunks.pop(ref_j)
                        gen[j], scored[j] = self._submit(g, call, scorer)
                continue
            if ref in index:
                values[i] = value
                self.chunks.pop(gen[i], None)
                self.followers = {f: c for f, c in self.followers.items() if c != gen[i]}
            self.followers.pop(ref, None)
        return gen, values

    def _generated(self, ref) -> bool:
        """Whether a generate call finished without error."""
        try:
            self.ray.get(ref, timeout=0)
            return True
        except Exception:
            return False

    def _restart_group(self, g: int, error: BaseException) -> None:
        """Replace model copy `g`'s members: every chunk still on the old ones fails and runs again."""
        K = self.ep
        print(f"grpo: expert-parallel sampler group {g} failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
              f"restarting its {K} members", flush=True)
        for a in self.samplers[g * K : (g + 1) * K]:
            self.ray.kill(a, no_restart=True)
        self.followers = {f: c for f, c in self.followers.items() if c in self.chunks and self.chunks[c][0] != g}
        self.samplers[g * K : (g + 1) * K] = self._start_group(g)  # in place: WeightSync holds this list
        self.epochs[g] += 1

    @property
    def restarts(self) -> int:
        """Expert-parallel groups restarted so far."""
        return sum(self.epochs)

    def close(self) -> None:
        """Let the reward workers stop their pools (the placement groups' release ends the actors)."""
        try:
            self.ray.get([s.close.remote() for s in self.scorers], timeout=10)
        except Exception as e:  # a dead or hung scorer must not stop the release
            print(f"grpo: closing the reward workers: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", flush=True)
        self.samplers, self.scorers = [], []


def records_of(scored: list[ScoredChunk]) -> list[ScoredRollout]:
    return [rec for chunk in scored for rec in chunk.records]


def completions_of(chunks: list[RolloutChunk]) -> list[str]:
    return [text for chunk in chunks for text in chunk.completions]


__all__ = ["RolloutChunk", "RolloutSampler", "Rollouts", "RewardWorker", "ScoredChunk", "completions_of", "quiet_teardown_hook", "records_of", "state_hash"]
