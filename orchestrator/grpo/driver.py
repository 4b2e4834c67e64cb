"""The GRPO driver: the loop, top to bottom.

Each step: draw prompts from the train split; the rollout samplers generate G completions per
prompt and the reward workers score each chunk as soon as it is done (rollout.py); with dynamic
sampling, groups whose rewards are all equal are refilled from the train split; group advantages
(rl.rollouts); one update on the learner ranks (learner.py); the new weights reach the samplers
(weight_sync.py); metrics, held-out evaluation (orchestrator/evaluate.py), checkpoints
(checkpoint.py). The driver handles ObjectRefs and small typed records, never token tensors.

`grpo.mode=sync` samples step k with the weights after step k-1; `async` samples ahead while the
learners train: steps up to k + `grpo.max_lag` are in flight while step k trains (max_lag 1: one step
off policy), so a sample is at most max_lag policy versions old; the lag per sample is recorded
(rollout/version_lag, rollout/version_lag_max) and `grpo.importance` corrects against the
sampler's behaviour log-probs, which include the lag.

Test: `pytest tests/orchestrator/test_orch_grpo.py`; benchmark: `python benchmarks/grpo_modes.py`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import deque
from pathlib import Path

from orchestrator.config import ConfigError, RunConfig
from orchestrator.grpo import checkpoint
from orchestrator.grpo.inputs import TaskStream, load_tasks, reward_config, resolve_init
from orchestrator.grpo.rollout import Rollouts, ScoredChunk, records_of
from rl.rollouts import ScoredRollout


@dataclasses.dataclass
class StepRollouts:
    """A step's rollouts: generation refs (the learners fetch them) and the scored chunks."""

    gen: list  # ObjectRefs of RolloutChunk
    scored: list[ScoredChunk]
    refill_rounds: int = 0
    wait_s: float = 0.0  # time the driver waited for them

    @property
    def records(self) -> list[ScoredRollout]:
        return records_of(self.scored)


def runtime_for(cfg: RunConfig):
    """(what the driver calls `ray`, the roles' placement): Ray and a placement group per role
    instance, or with grpo.runtime=one_process this process (orchestrator/one_process.py)."""
    if cfg.grpo.runtime == "one_process":
        from orchestrator.one_process import NoPlacement, OneProcess

        return OneProcess(cfg), NoPlacement()
    import ray

    from orchestrator.placement import RolePlacement, cluster_gpus, roles_for

    # every role instance gets its own bundle: learners packed, samplers and evaluators spread
    return ray, RolePlacement(ray, roles_for(cfg, "grpo", cluster_gpus(ray)), autoscaling=cfg.cluster.autoscaling,
                              timeout_s=cfg.cluster.placement_timeout_s)


class Driver:
    def __init__(self, cfg: RunConfig, run_dir: Path, tracker):
        from data.tokenizer import load_tokenizer

        self.cfg, self.run_dir, self.tracker = cfg, Path(run_dir), tracker
        if cfg.rollout.exact and cfg.grpo.zero_stage == 3:
            raise ConfigError("key 'rollout.exact' needs whole weights on every learner: set grpo.zero_stage to 0, 1 or 2")
        if cfg.grpo.max_lag > 1 and cfg.grpo.mode != "async":
            raise ConfigError(f"key 'grpo.max_lag' ({cfg.grpo.max_lag}) applies to grpo.mode=async only: set grpo.mode=async or max_lag 1")
        self.hf_dir, self.tok_path = resolve_init(cfg)
        self.tok = load_tokenizer(self.tok_path)
        self.train_rows, self.heldout_rows = load_tasks(cfg)
        self.stream = TaskStream(self.train_rows, cfg.seed)
        self.rewards = reward_config(cfg)
        self.ray, self.placement = runtime_for(cfg)
        try:
            self._start_roles()
        except BaseException:  # a role that cannot start: give its placement groups back (one_process: its threads)
            self.placement.close()
            if cfg.grpo.runtime == "one_process":
                self.ray.close()
            raise
        self.step = 0

    def _start_roles(self) -> None:
        from orchestrator.grpo.learner import PolicyLearner, ReferenceModel
        from orchestrator.grpo.weight_sync import WeightSync, rendezvous_at

        ray, cfg, g = self.ray, self.cfg, self.cfg.grpo
        opts = self.placement.options
        self.rollouts = Rollouts(ray, self.placement, hf_dir=self.hf_dir, tok_path=self.tok_path, template=cfg.data.template,
                                 rewards=self.rewards, rollout_cfg=cfg.rollout, num_evaluators=g.num_evaluators, seed=cfg.seed)
        self.reference = None
        if g.kl_beta > 0 and g.reference == "actor":
            self.reference = ray.remote(ReferenceModel).options(**opts("reference", 0)).remote(str(self.hf_dir), pad_id=self.tok.pad_id)
        # learner rank 0 hosts the torch.distributed store
        addr, port = ray.rendezvous() if g.runtime == "one_process" else rendezvous_at(ray, self.placement)
        Learner = ray.remote(PolicyLearner)
        self.learners = [Learner.options(**opts("learner", i)).remote(
            str(self.hf_dir), g, rank=i, world=g.learners, master_addr=addr, master_port=port, pad_id=self.tok.pad_id,
            seed=cfg.seed, max_new_tokens=cfg.rollout.max_new_tokens, exact=cfg.rollout.exact) for i in range(g.learners)]
        self.weights = WeightSync(ray, self.placement, self.learners, self.rollouts.samplers, g, sampler_ep=cfg.rollout.expert_parallel)
        if g.runtime == "one_process":  # the learner's and the sampler's torch threads
            ray.started([*self.learners, *self.rollouts.samplers, *([self.reference] if self.reference else [])])

    @property
    def version(self) -> int:
        return self.weights.version

    def close(self) -> None:
        """Release the placement groups (the role actors go with them), reward workers first."""
        self.rollouts.close()
        self.learners, self.reference = [], None
        self.placement.close()
        if self.cfg.grpo.runtime == "one_process":
            self.ray.close()

    def __enter__(self) -> "Driver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- rollouts ------------------------------------------------------------------------------

    def sample_step(self, step: int) -> StepRollouts:
        """Submit the step's prompts (no waiting); `collect` waits for them."""
        g = self.cfg.grpo
        gen, score = self.rollouts.launch(self.stream.take(g.prompts_per_step), seed_key=(step, 0), group_size=g.group_size,
                                          temperature=self.cfg.rollout.temperature, weights=self.weights.sampler_weights, version=self.version)
        return StepRollouts(gen=gen, scored=score)

    def collect(self, pending: StepRollouts, step: int) -> StepRollouts:
        """Wait for a step's scores; dynamic sampling refills zero-variance groups."""
        from rl.rollouts import varied_groups

        g = self.cfg.grpo
        t0 = time.perf_counter()
        batch = StepRollouts(*self.rollouts.results(pending.gen, pending.scored))
        while g.dynamic_sampling and batch.refill_rounds < g.max_refill_rounds:
            missing = g.prompts_per_step - len(varied_groups(batch.records))
            if missing <= 0:
                break
            batch.refill_rounds += 1
            first = 1 + max(rec.group for rec in batch.records)
            gen, score = self.rollouts.launch(
                self.stream.take(missing), seed_key=(step, batch.refill_rounds), group_size=g.group_size, first_group=first,
                temperature=self.cfg.rollout.temperature, weights=self.weights.sampler_weights, version=self.version)
            gen, scored = self.rollouts.results(gen, score)
            batch.scored += scored
            batch.gen += gen
        batch.wait_s = time.perf_counter() - t0
        return batch

    # --- one update ----------------------------------------------------------------------------

    def advantages(self, records: list[ScoredRollout]) -> tuple[list[float | None], dict]:
        from rl.rollouts import rollout_advantages

        g = self.cfg.grpo
        return rollout_advantages(records, scale=g.advantage_scale, drop_zero_variance=g.dynamic_sampling,
                                  drop_truncated=g.overlong == "filter")

    def learn(self, batch: StepRollouts, adv: list[float | None], step: int) -> dict:
        """One update on every learner rank, then the new weights to the samplers."""
        t0 = time.perf_counter()
        extra = {"reference": self.reference.logprobs.remote(adv, *batch.gen)} if self.reference is not None else {}
        metrics = self.ray.get([l.train.remote(adv, step, *batch.gen, **extra) for l in self.learners])
        t_learn = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.weights.sync(self.version + 1)
        # learner rank 0's metrics; those named with a namespace (mismatch/, is/) keep it
        m0 = {k if "/" in k else f"train/{k}": v for k, v in metrics[0].items() if k not in ("samples", "learn_seconds")}
        return {**m0, "timing/learn": t_learn, "timing/sync": time.perf_counter() - t0, **self.weights.metrics()}

    # --- evaluation and checkpoints ------------------------------------------------------------

    def evaluate(self, step: int):
        """The held-out evaluator on the current policy; per-task rows go to heldout.jsonl."""
        from orchestrator.evaluate import heldout, write_rows

        if not self.heldout_rows:
            return None
        res = heldout(self.rollouts, self.heldout_rows, samples=self.cfg.grpo.heldout_samples, temperature=self.cfg.rollout.temperature,
                      weights=self.weights.sampler_weights, version=self.version)
        write_rows(self.run_dir / "heldout.jsonl", res, step=step)
        return res

    def save(self, step: int) -> None:
        state = checkpoint.DriverState(step=step, version=self.version, data_position=self.stream.position)
        checkpoint.save(self.ray, self.learners, self.run_dir, state, keep=self.cfg.grpo.keep_checkpoints)

    def resume(self) -> int:
        state = checkpoint.resume(self.ray, self.learners, self.run_dir)
        if state is None:
            return 0
        self.stream.position = state.data_position
        self.weights.sync(state.version)
        print(f"grpo: resumed from step {state.step} (policy version {state.version})", flush=True)
        return state.step

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> dict:
        """Steps from the last checkpoint to `grpo.steps` (or `stop_after`); {"before", "after"} held-out results."""
        from orchestrator.grpo.metrics import ProgressLine, rollout_table, step_metrics

        g, t = self.cfg.grpo, self.cfg.tracking
        start = self.resume()
        self.tracker.drop_after(start if start else -1)  # what a stopped run logged after its checkpoint runs again
        last = min(g.steps, g.stop_after or g.steps)
        before = self.evaluate(step=0) if start == 0 else None
        if before is not None:
            self.tracker.log(before.metrics(), step=0)
            print(f"grpo: held-out accuracy before GRPO {before.greedy:.3f} greedy"
                  + (f", pass@1 {before.sampled:.3f} sampled" if before.sampled is not None else ""), flush=True)
        after, line = None, ProgressLine("grpo", start, g.steps)
        pending = deque([self.sample_step(start + 1)] if start < last else [])  # steps sampled, in order
        launched = start + len(pending)  # the last step whose sampling was submitted
        t_loop, out_of_time, table_due = time.perf_counter(), False, False
        for step in range(start + 1, last + 1):
            t_step = time.perf_counter()
            batch = self.collect(pending.popleft(), step)
            while g.mode == "async" and launched < min(last, step + g.max_lag):
                launched += 1
                pending.append(self.sample_step(launched))  # samples with the weights before this update
            adv, adv_m = self.advantages(batch.records)
            learn = self.learn(batch, adv, step)
            if g.mode == "sync" and step < last:
                launched = step + 1
                pending.append(self.sample_step(launched))
            metrics = step_metrics(batch, adv, {**adv_m, **learn}, self.rewards, version=self.version,
                                   seconds=time.perf_counter() - t_step)
            # grpo.max_seconds: this step is the last once the loop has run that long (a time budget)
            out_of_time = g.max_seconds is not None and time.perf_counter() - t_loop >= g.max_seconds and step < last
            evaluated = step % g.eval_every == 0 or step == g.steps or out_of_time
            if evaluated:
                after = self.evaluate(step)
                metrics.update(after.metrics() if after is not None else {})
            logged = evaluated or step % t.log_every == 0 or step == last
            table_due = table_due or step % g.table_every == 0 or step == 1  # shown at the next logged step
            if logged and table_due:  # before the step's metrics: W&B's follower sends them with that record
                table_due = False
                self.tracker.table(*rollout_table(self.ray.get(batch.gen[0]), batch.records, adv, self.rewards, step))
                self.tracker.histograms({"rollout/response_length": [x.length for x in batch.records],
                                         "reward/distribution": [x.reward for x in batch.records]}, step=step)
            if logged:
                self.tracker.log(metrics, step=step)
                line.show(step, metrics, out=sys.stdout)
            if step % g.checkpoint_every == 0 or step == last or out_of_time:
                self.save(step)
            self.step = step
            if out_of_time:
                print(f"grpo: stopped after step {step}: grpo.max_seconds ({g.max_seconds:.0f} s) reached", flush=True)
                break
        return {"before": before, "after": after if last == g.steps or out_of_time else None}
