"""`sputnik grpo`: the R1-Zero loop on Ray actors.

Each step the driver draws prompts from the train split; RolloutSampler actors generate G
completions per prompt; a RewardWorker actor scores each sampler chunk as soon as that chunk is
done (the driver chains the ObjectRefs, it never waits on one chunk to start the next); the driver
turns rewards into group advantages (only small per-sample records reach it); the PolicyLearner
ranks (one torch.distributed group, DeepSpeed ZeRO) fetch the chunks themselves and update the
policy; the new weights reach the samplers, tagged with the policy version, by a broadcast from
learner rank 0 over a group of their own (`grpo.weight_sync`: NCCL on GPUs, gloo on CPU; the
default on GPUs) or through the object store (one object, fetched by every sampler; the default on
CPU). A failed broadcast falls back to the object store and makes a new group.

Modes: `grpo.mode=sync` samples step k with the weights after step k-1; `async` (one step off
policy) samples step k+1 while the learners train on step k, and records the version lag.
Options: dynamic sampling (drop zero-variance groups and refill from the train split, up to
`max_refill_rounds`), overlong filtering (truncated completions leave the loss) or penalty (the
DAPO `overlong` reward), the KL to a frozen reference colocated with the learners or in its own
actor (`grpo.reference`).

Samplers and reward workers restart after a crash (`max_restarts`) and their calls are retried;
every generate call names the weights it must use, so a restarted sampler resumes with the right
policy, and every prompt of a step is scored exactly once in the step's records. Checkpoints hold
the DeepSpeed state of every learner (policy, optimizer), the data position and the step;
re-running with the same `--out` resumes from the latest complete one.

Test: `pytest tests/orchestrator/test_orch_grpo.py`; benchmark: `python benchmarks/grpo_modes.py`.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.config import ConfigError, RunConfig, to_dict
from orchestrator.rundir import create_run_dir

ACCURACY_REWARDS = ("math_accuracy", "code_tests")


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


def resolve_init(cfg: RunConfig) -> tuple[Path, Path]:
    """(HF model directory, tokenizer.json) from `grpo.init`: a pretrain run directory or an HF directory."""
    g = cfg.grpo
    if not g.init:
        raise ConfigError("key 'grpo.init' is required: a `sputnik pretrain` run directory (or an HF directory plus grpo.tokenizer)")
    init = Path(g.init)
    if not init.is_dir():
        raise ConfigError(f"key 'grpo.init': {init} is not a directory")
    summary = init / "summary.json"
    if (init / "config.json").is_file():
        hf = init
        tok = Path(g.tokenizer) if g.tokenizer else None
    elif summary.is_file():
        s = json.loads(summary.read_text())
        hf = Path(s.get("hf_export", init / "hf"))
        tok = Path(g.tokenizer or s.get("tokenizer", ""))
    else:
        raise ConfigError(f"key 'grpo.init': {init} holds neither an HF model (config.json) nor a pretrain run (summary.json)")
    if not (hf / "config.json").is_file():
        raise ConfigError(f"key 'grpo.init': no HF model in {hf} (was the pretraining run finished and exported?)")
    if tok is None or not tok.is_file():
        raise ConfigError(f"key 'grpo.tokenizer': tokenizer.json not found ({tok}); set grpo.tokenizer")
    return hf, tok


def load_tasks(cfg: RunConfig):
    """(train rows, held-out rows) as lists of dicts."""
    g, d = cfg.grpo, cfg.data
    if g.tasks == "arithmetic":
        from data.tasks import generate_arithmetic

        kw = dict(families=tuple(d.families), digits=d.digits, heldout_percent=d.heldout_percent)
        train = generate_arithmetic(g.train_size, seed=cfg.seed, split="train", **kw)
        heldout = generate_arithmetic(g.heldout_size, seed=cfg.seed + 1, split="heldout", **kw)
        return train.to_pylist(), heldout.to_pylist()
    if g.tasks == "code":
        from data.tasks import generate_code_tasks

        kw = dict(digits=d.digits, heldout_percent=d.heldout_percent)
        train = generate_code_tasks(g.train_size, seed=cfg.seed, split="train", **kw)
        heldout = generate_code_tasks(g.heldout_size, seed=cfg.seed + 1, split="heldout", **kw)
        return train.to_pylist(), heldout.to_pylist()
    from data.tasks import read_tasks

    if not Path(g.tasks).is_file():
        raise ConfigError(f"key 'grpo.tasks': {g.tasks!r} is neither a generator (arithmetic, code) nor a task file")
    rows = read_tasks(g.tasks).to_pylist()
    train = [r for r in rows if r["split"] == "train"]
    heldout = [r for r in rows if r["split"] != "train"][: g.heldout_size]
    if not train:
        raise ConfigError(f"key 'grpo.tasks': {g.tasks} has no train-split tasks")
    return train, heldout


def reward_config(cfg: RunConfig):
    """The `rewards:` section, plus the DAPO overlong penalty when grpo.overlong=penalty."""
    from pydantic import TypeAdapter

    from rl.rewards import RewardConfig, RewardSpec

    rc = TypeAdapter(RewardConfig).validate_python(cfg.rewards) if isinstance(cfg.rewards, dict) else cfg.rewards
    if cfg.grpo.overlong == "penalty" and not any(s.name == "overlong" for s in rc.rewards):
        n = cfg.rollout.max_new_tokens
        rc.rewards.append(RewardSpec("overlong", 1.0, {"max_len": n, "cache_len": max(1, n // 4)}))
    return rc


def validate(cfg: RunConfig) -> None:
    g = cfg.grpo
    if g.learners > 1 and g.minibatch_size < g.learners:
        raise ConfigError(f"key 'grpo.minibatch_size' ({g.minibatch_size}) must be at least grpo.learners ({g.learners})")
    if cfg.cluster.address is None and cfg.cluster.num_cpus is not None:  # the embedded Ray: one node of num_cpus
        from orchestrator.placement import Node, PlanError, make_plan, roles_for

        try:
            make_plan(roles_for(cfg, "grpo", 0), [Node(float(cfg.cluster.num_cpus))])
        except PlanError as e:
            raise ConfigError(f"key 'cluster.num_cpus' ({cfg.cluster.num_cpus}) is too small: {e}") from None


def _rendezvous() -> tuple[str, int]:
    """This node's address and a free port on it (run inside learner 0's bundle)."""
    import ray

    addr = ray.util.get_node_ip_address()
    return addr, _free_port(addr)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TaskStream:
    """Train prompts in a seeded order, reshuffled every epoch; `position` is the data position."""

    def __init__(self, rows: list[dict], seed: int, position: int = 0):
        self.rows, self.seed, self.position = rows, seed, position

    def take(self, n: int) -> list[dict]:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, len(self.rows))
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            out.append(self.rows[int(order[i])])
            self.position += 1
        return out


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


class Driver:
    def __init__(self, cfg: RunConfig, run_dir: Path, tracker, *, learners: bool = True):
        import ray

        from orchestrator.grpo_roles import PolicyLearner, ReferenceModel, RewardWorker, RolloutSampler

        self.cfg, self.run_dir, self.tracker = cfg, run_dir, tracker
        g, r = cfg.grpo, cfg.rollout
        self.hf_dir, self.tok_path = resolve_init(cfg)
        from data.tokenizer import load_tokenizer

        self.tok = load_tokenizer(self.tok_path)
        self.train_rows, self.heldout_rows = load_tasks(cfg)
        self.stream = TaskStream(self.train_rows, cfg.seed)
        self.rewards = reward_config(cfg)
        self.acc_name = next((s.name for s in self.rewards.rewards if s.name in ACCURACY_REWARDS), None)
        # Every role instance gets its own placement-group bundle: learners packed, samplers and
        # evaluators spread over the nodes (orchestrator/placement.py).
        from orchestrator.placement import RolePlacement, cluster_gpus, roles_for

        roles = roles_for(cfg, "grpo" if learners else "eval", cluster_gpus(ray))
        self.placement = RolePlacement(ray, roles, autoscaling=bool(cfg.cluster.address), timeout_s=cfg.cluster.placement_timeout_s)
        # Samplers and reward workers come back after a crash (into their bundle, rescheduled if
        # their node died) and their calls are retried.
        restart = dict(max_restarts=-1, max_task_retries=-1)
        Sampler = ray.remote(**restart)(RolloutSampler)
        Scorer = ray.remote(**restart)(RewardWorker)
        Learner = ray.remote(PolicyLearner)
        opts = self.placement.options
        self.samplers = [Sampler.options(**opts("sampler", i)).remote(str(self.hf_dir), str(self.tok_path), template=cfg.data.template)
                         for i in range(r.num_samplers)]
        self.scorers = [Scorer.options(**opts("evaluator", i)).remote(self.rewards, max_len=r.max_new_tokens) for i in range(g.num_evaluators)]
        self.reference = None
        if learners and g.kl_beta > 0 and g.reference == "actor":
            Ref = ray.remote(ReferenceModel)
            self.reference = Ref.options(**opts("reference", 0)).remote(str(self.hf_dir), pad_id=self.tok.pad_id)
        self.learners = []
        if learners:
            # Rank 0 hosts the torch.distributed rendezvous: its node's address, a free port there.
            rank0 = Learner.options(**opts("learner", 0))
            addr, port = ray.get(ray.remote(_rendezvous).options(**{**opts("learner", 0), "num_cpus": 0, "num_gpus": 0}).remote())
            self.learners = [
                (rank0 if i == 0 else Learner.options(**opts("learner", i))).remote(
                    str(self.hf_dir), g, rank=i, world=g.learners, master_addr=addr, master_port=port, pad_id=self.tok.pad_id, seed=cfg.seed)
                for i in range(g.learners)
            ]
        self.version = 0
        self.weights_ref = None  # ObjectRef of the latest policy state (None: the init checkpoint)
        self.step = 0
        self.ray = ray
        self.collective = bool(self.learners) and (
            g.weight_sync == "collective" or (g.weight_sync == "auto" and ray.get(self.learners[0].device_type.remote()) == "cuda"))
        self.sync_groups = 0  # weight-sync groups made so far (a new one after a failed broadcast)
        self.sync_fallbacks = 0  # syncs that went through the object store because a broadcast failed
        self.sync_ready = self.collective and self.make_sync_group()

    def close(self) -> None:
        """Let the reward workers stop their pools, then release the placement groups; the role
        actors in them go with them."""
        try:
            self.ray.get([s.close.remote() for s in self.scorers], timeout=10)
        except Exception as e:  # a dead or hung scorer must not stop the release
            print(f"grpo: closing the reward workers: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", flush=True)
        self.samplers, self.scorers, self.learners, self.reference = [], [], [], None
        self.placement.close()

    def __enter__(self) -> "Driver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- rollouts ------------------------------------------------------------------------------

    def launch(self, tasks: list[dict], *, step: int, round_: int, group_size: int, temperature: float, first_group: int = 0):
        """Submit generation + scoring for `tasks`; returns (generation refs, score refs), no waiting."""
        r = self.cfg.rollout
        S = len(self.samplers)
        per = max(1, math.ceil(len(tasks) / (S * 2)))  # two chunks per sampler: scoring overlaps generation
        gen, score = [], []
        for c, lo in enumerate(range(0, len(tasks), per)):
            chunk = tasks[lo : lo + per]
            seed = int(np.random.default_rng([self.cfg.seed, step, round_, c]).integers(2**31))
            ref = self.samplers[c % S].generate.remote(
                chunk, list(range(first_group + lo, first_group + lo + len(chunk))),
                None if self.weights_ref is None else [self.weights_ref], self.version,
                group_size=group_size, max_new_tokens=r.max_new_tokens, temperature=temperature, top_p=r.top_p, seed=seed,
            )
            gen.append(ref)
            score.append(self.scorers[c % len(self.scorers)].score.remote(ref))
        return gen, score

    def sample_step(self, step: int):
        g = self.cfg.grpo
        tasks = self.stream.take(g.prompts_per_step)
        gen, score = self.launch(tasks, step=step, round_=0, group_size=g.group_size, temperature=self.cfg.rollout.temperature)
        return {"tasks": tasks, "gen": gen, "score": score, "t0": time.perf_counter()}

    def collect(self, pending: dict, step: int) -> dict:
        """Wait for a step's scores; dynamic sampling refills zero-variance groups."""
        g = self.cfg.grpo
        t_wait = time.perf_counter()
        results = self.ray.get(pending["score"])
        gen, rounds = list(pending["gen"]), 0
        if g.dynamic_sampling:
            while rounds < g.max_refill_rounds:
                kept = _kept_groups(results, g.group_size)
                missing = g.prompts_per_step - len(kept)
                if missing <= 0:
                    break
                rounds += 1
                extra = self.stream.take(missing)
                first = 1 + max(rec["group"] for res in results for rec in res["records"])
                more_gen, more_score = self.launch(extra, step=step, round_=rounds, group_size=g.group_size,
                                                   temperature=self.cfg.rollout.temperature, first_group=first)
                results += self.ray.get(more_score)
                gen += more_gen
        return {"results": results, "gen": gen, "refill_rounds": rounds, "wait_s": time.perf_counter() - t_wait,
                "t0": pending["t0"]}

    # --- one update ----------------------------------------------------------------------------

    def advantages(self, results: list[dict]) -> tuple[list[float | None], dict]:
        from rl.grpo import group_advantages

        g = self.cfg.grpo
        records = [rec for res in results for rec in res["records"]]
        groups: dict[int, list[int]] = {}
        for i, rec in enumerate(records):
            groups.setdefault(rec["group"], []).append(i)
        rewards = torch.tensor([[records[i]["reward"] for i in idx] for idx in groups.values()], dtype=torch.float64)
        adv = group_advantages(rewards, scale=g.advantage_scale)
        zero_var = (rewards == rewards[:, :1]).all(dim=1)
        out: list[float | None] = [None] * len(records)
        for row, idx in enumerate(groups.values()):
            for col, i in enumerate(idx):
                keep = not (g.dynamic_sampling and zero_var[row]) and not (g.overlong == "filter" and records[i]["truncated"])
                out[i] = float(adv[row, col]) if keep else None
        return out, {"zero_variance_frac": float(zero_var.float().mean()), "groups": len(groups)}

    def learn(self, batch: dict, adv: list[float | None], step: int) -> dict:
        t0 = time.perf_counter()
        extra = {"reference": self.reference.logprobs.remote(adv, *batch["gen"])} if self.reference is not None else {}
        metrics = self.ray.get([l.train.remote(adv, step, *batch["gen"], **extra) for l in self.learners])
        t_learn = time.perf_counter() - t0
        self.version += 1
        t0 = time.perf_counter()
        self.sync_weights()
        t_sync = time.perf_counter() - t0
        m0 = metrics[0]
        return {**{k: v for k, v in m0.items() if k not in ("samples", "learn_seconds")}, "time/learn": t_learn, "time/sync": t_sync,
                "weight_sync/collective": float(self.collective and self.sync_ready), "weight_sync/fallbacks": self.sync_fallbacks}

    def make_sync_group(self) -> bool:
        """A weight-sync group of learner rank 0 (rank 0, hosting the store) and the samplers; NCCL
        when all of them hold a GPU, gloo otherwise. False (with a warning) if it could not be made."""
        ray, g = self.ray, self.cfg.grpo
        metas = ray.get([l.weights_meta.remote() for l in self.learners])  # every rank: ZeRO-3 gathers
        devices = ray.get([self.learners[0].device_type.remote()] + [s.device_type.remote() for s in self.samplers])
        backend = "nccl" if all(d == "cuda" for d in devices) else "gloo"
        addr, port = ray.get(ray.remote(_rendezvous).options(
            **{**self.placement.options("learner", 0), "num_cpus": 0, "num_gpus": 0}).remote())
        self.sync_groups += 1
        kw = dict(tag=f"weights{self.sync_groups}", world=len(self.samplers) + 1, meta=metas[0], backend=backend, timeout_s=g.sync_timeout_s)
        calls = [self.learners[0].join_sync_group.remote(addr, port, **kw)]
        calls += [s.join_sync_group.remote(addr, port, rank=i + 1, **kw) for i, s in enumerate(self.samplers)]
        try:
            ray.get(calls, timeout=g.sync_timeout_s + 30)
        except Exception as e:
            print(f"grpo: could not make the weight-sync group ({type(e).__name__}: {str(e)[:200]}); syncing through the object store", flush=True)
            return False
        print(f"grpo: weight sync by {backend} broadcast from learner 0 to {len(self.samplers)} sampler(s)", flush=True)
        return True

    def sync_weights(self) -> None:
        """The new policy reaches every sampler: broadcast from learner rank 0 (`grpo.weight_sync`
        collective), or one object in the object store that each sampler fetches. Either way the
        state is also an ObjectRef, which a restarted sampler loads and a failed broadcast falls back to."""
        ray = self.ray
        if self.collective and not self.sync_ready:
            self.sync_ready = self.make_sync_group()
        broadcast = self.collective and self.sync_ready
        outs = [l.publish.options(num_returns=3).remote(broadcast) for l in self.learners]  # all ranks: ZeRO-3 gathers
        self.weights_ref = outs[0][1]
        lagging = self.samplers
        if broadcast:
            try:
                got = ray.get([s.receive_weights.remote(self.version) for s in self.samplers], timeout=self.cfg.grpo.sync_timeout_s + 30)
                sent = ray.get(outs[0][2])
            except Exception as e:
                print(f"grpo: weight broadcast failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
                got, sent = [False] * len(self.samplers), False
            lagging = [s for s, ok in zip(self.samplers, got) if not (ok and sent)]
            if lagging:
                self.sync_ready, self.sync_fallbacks = False, self.sync_fallbacks + 1
                print(f"grpo: {len(lagging)} sampler(s) missed the broadcast of version {self.version}: loading it from the object store, "
                      "and a new weight-sync group for the next step", flush=True)
        ray.get([o[0] for o in outs])
        if lagging:
            ray.get([s.load_weights.remote(self.weights_ref, self.version) for s in lagging])

    # --- evaluation ----------------------------------------------------------------------------

    def heldout(self) -> dict:
        """Greedy pass@1 on the held-out split, plus how often and how long the policy reasons."""
        if not self.heldout_rows:
            return {}
        _, score = self.launch(self.heldout_rows, step=0, round_=10**6, group_size=1, temperature=0.0)
        recs = [rec for res in self.ray.get(score) for rec in res["records"]]
        acc = [rec["rewards"].get(self.acc_name, 0.0) if self.acc_name else rec["reward"] for rec in recs]
        return {"heldout/accuracy": float(np.mean(acc)), "heldout/reasoning_frac": float(np.mean([r["reasons"] for r in recs])),
                "heldout/length_mean": float(np.mean([r["length"] for r in recs]))}

    def export(self, out: Path) -> Path:
        """The current policy as an HF directory (the weights the samplers hold)."""
        from model.hf import from_hf_pretrained, save_hf_pretrained

        model = from_hf_pretrained(self.hf_dir)
        if self.weights_ref is not None:
            model.load_state_dict(self.ray.get(self.weights_ref))
        save_hf_pretrained(model, out)
        return out

    # --- checkpoints ---------------------------------------------------------------------------

    def save(self, step: int) -> None:
        ckpt = self.run_dir / "checkpoints"
        tag = f"step{step:06d}"
        self.ray.get([l.save.remote(str(ckpt / "learners"), tag, {"version": self.version, "step": step}) for l in self.learners])
        state = {"step": step, "version": self.version, "data_position": self.stream.position, "tag": tag}
        tmp = ckpt / f".{tag}.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(ckpt / f"{tag}.json")  # the marker that makes the checkpoint complete
        done = sorted(ckpt.glob("step*.json"))
        for old in done[: -self.cfg.grpo.keep_checkpoints]:
            shutil.rmtree(ckpt / "learners" / old.stem, ignore_errors=True)
            old.unlink()

    def resume(self) -> int:
        ckpt = self.run_dir / "checkpoints"
        done = sorted(ckpt.glob("step*.json"))
        if not done:
            return 0
        state = json.loads(done[-1].read_text())
        self.ray.get([l.load.remote(str(ckpt / "learners"), state["tag"]) for l in self.learners])
        self.version = state["version"]
        self.stream.position = state["data_position"]
        self.sync_weights()
        print(f"grpo: resumed from step {state['step']} (policy version {self.version})", flush=True)
        return state["step"]

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> dict:
        g = self.cfg.grpo
        start = self.resume()
        before = self.heldout() if start == 0 else {}
        if before:
            self.tracker.log(before, step=0)
            print(f"grpo: held-out accuracy before GRPO {before['heldout/accuracy']:.3f}", flush=True)
        last = min(g.steps, g.stop_after or g.steps)
        pending = self.sample_step(start + 1) if start < last else None
        from orchestrator.tracking import progress

        for step in progress(range(start + 1, last + 1), total=last - start, description="grpo"):
            t_step = time.perf_counter()
            batch = self.collect(pending, step)
            if g.mode == "async" and step < last:
                pending = self.sample_step(step + 1)  # samples with the weights before this update
            adv, adv_m = self.advantages(batch["results"])
            learn = self.learn(batch, adv, step)
            if g.mode == "sync" and step < last:
                pending = self.sample_step(step + 1)
            metrics = self.step_metrics(batch, adv, adv_m, learn, time.perf_counter() - t_step)
            if step % g.eval_every == 0 or step == g.steps:
                metrics.update(self.heldout())
            self.tracker.log(metrics, step=step)
            if step % g.table_every == 0 or step == 1:
                self.log_samples(batch, adv, step)
            if step % g.checkpoint_every == 0 or step == last:
                self.save(step)
            self.step = step
        after = {k: v for k, v in metrics.items() if k.startswith("heldout/")} if last == g.steps else {}
        return {"before": before, "after": after}

    def step_metrics(self, batch, adv, adv_m, learn, seconds) -> dict:
        results = batch["results"]
        recs = [rec for res in results for rec in res["records"]]
        rewards = np.array([r["reward"] for r in recs])
        m: dict[str, Any] = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std())}
        for spec in self.rewards.rewards:
            m[f"reward/{spec.name}"] = float(np.mean([r["rewards"].get(spec.name, 0.0) for r in recs]))
        if self.acc_name:
            m["accuracy"] = m[f"reward/{self.acc_name}"]
        lengths = np.array([r["length"] for r in recs])
        tokens = sum(res["tokens"] for res in results)
        m.update({
            "response_length_mean": float(lengths.mean()), "response_length_max": int(lengths.max()),
            "truncated_frac": float(np.mean([r["truncated"] for r in recs])),
            "reasoning_frac": float(np.mean([r["reasons"] for r in recs])),
            **adv_m, "samples_in_loss": sum(a is not None for a in adv), "refill_rounds": batch["refill_rounds"],
            "version_lag": float(np.mean([self.version - 1 - r["version"] for r in recs])),
            "reward_errors": sum(sum(res["reward_errors"].values()) for res in results[-1:]),
            "time/generate": float(sum(res["gen_seconds"] for res in results)),
            "time/score": float(sum(res["seconds"] for res in results)),
            "time/wait_rollouts": batch["wait_s"], "time/step": seconds, "tokens_per_s": tokens / max(seconds, 1e-9),
            **learn,
        })
        return m

    def log_samples(self, batch, adv, step: int, n: int = 8) -> None:
        recs = [rec for res in batch["results"] for rec in res["records"]]
        gen = self.ray.get(batch["gen"][0])  # the first chunk's texts, for reading
        rows = []
        for i in range(min(n, len(gen["completion"]))):
            rec = recs[i]
            rows.append([step, gen["task"][i]["prompt"], gen["completion"][i], *(rec["rewards"].get(s.name, 0.0) for s in self.rewards.rewards), adv[i]])
        cols = ["step", "prompt", "completion", *(s.name for s in self.rewards.rewards), "advantage"]
        self.tracker.table("rollouts", cols, rows, step=step)


def _kept_groups(results: list[dict], group_size: int) -> set[int]:
    by: dict[int, list[float]] = {}
    for res in results:
        for rec in res["records"]:
            by.setdefault(rec["group"], []).append(rec["reward"])
    return {k for k, v in by.items() if len(set(v)) > 1}


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def execute(cfg: RunConfig, out: str | Path | None) -> tuple[Path, dict]:
    from orchestrator.placement import check_shared_storage
    from orchestrator.ray_local import init_ray
    from orchestrator.tracking import Tracker

    validate(cfg)
    resolve_init(cfg)
    run_dir = create_run_dir(cfg, out)
    print(f"grpo: run directory {run_dir}", flush=True)
    random.seed(cfg.seed)
    ray = init_ray(cfg.cluster)
    check_shared_storage(ray, run_dir)
    with Tracker(run_dir, cfg.tracking, name=cfg.name, config=to_dict(cfg), job_type="grpo") as tracker, \
            Driver(cfg, run_dir, tracker) as driver:
        result = driver.run()
        figures = {"grpo_steps": driver.step, "policy_version": driver.version, "tokenizer": str(driver.tok_path)}
        if driver.step == cfg.grpo.steps:
            figures["hf_export"] = str(driver.export(run_dir / "hf"))
        if result["before"]:
            figures["heldout_accuracy_before"] = result["before"]["heldout/accuracy"]
        if result["after"]:
            figures["heldout_accuracy_after"] = result["after"]["heldout/accuracy"]
            print(f"grpo: held-out accuracy after GRPO {figures['heldout_accuracy_after']:.3f}", flush=True)
        tracker.summary(figures)
    return run_dir, result


def run(cfg: RunConfig, cli_args) -> int:
    execute(cfg, cli_args.out)
    return 0
