"""`sputnik grpo`: R1-Zero-style GRPO on Ray actors.

What is implemented (rl/grpo.py has the formulas): G completions per prompt, rewards from
verifiers (rl/rewards), group-relative advantages ((r - mean) / std, or only centred with
`grpo.advantage_scale=none` as in Dr. GRPO), the clipped surrogate with DAPO's clip-higher
(`clip_low`, `clip_high`), loss aggregation per token (DAPO), per sequence (GRPO) or by a constant
(Dr. GRPO), an optional k3 KL to a frozen reference (`kl_beta`; 0 loads no reference), an optional
entropy bonus, DAPO's dynamic sampling and overlong filtering or soft penalty, and one-step
off-policy sampling (`grpo.mode=async`). Left out: value models, reward models, multi-turn rollouts.

The package, one concept per file:
- driver.py       the loop, top to bottom (start here)
- rollout.py      RolloutSampler and RewardWorker actors, and the driver's handle on them
- learner.py      PolicyLearner (DeepSpeed ranks) and the reference model
- update.py       the learner's optimizer steps: global minibatches, length-sorted micro-batches
- batch.py        the learner's batch: log-prob module, packed rows, the samplers' behaviour beside them
- weight_sync.py  new weights to the samplers: object store or a broadcast from learner rank 0
- checkpoint.py   GRPO checkpoints and resume
- inputs.py       the init model and tokenizer, tasks, rewards, config checks
- metrics.py      the step's metrics, the rollouts table, the progress line
The held-out evaluator is orchestrator/evaluate.py (shared with the demo and `sputnik eval`); the
report is orchestrator/report.py.

Test: `pytest tests/orchestrator/test_orch_grpo.py`.
"""

from __future__ import annotations

import random
from pathlib import Path

from orchestrator.config import RunConfig, to_dict
from orchestrator.grpo.driver import Driver
from orchestrator.grpo.inputs import load_tasks, resolve_init, reward_config, validate
from orchestrator.rundir import create_run_dir


def export_policy(driver: Driver, out: Path) -> Path:
    """The final policy and its tokenizer as an HF directory, from the checkpoint of the last step
    (the learners' fp32 weights, read one tensor at a time as `sputnik export` reads them: the
    driver never holds the model, which at DeepSeek-V3's size no single process can)."""
    from orchestrator.checkpoints import find_checkpoints, model_args
    from orchestrator.export import export_checkpoint

    ckpt = find_checkpoints(driver.run_dir)[-1]
    if ckpt.step != driver.step:
        raise RuntimeError(f"grpo: the last checkpoint of {driver.run_dir} is of step {ckpt.step}, not the last step {driver.step}")
    export_checkpoint(ckpt, model_args(driver.run_dir, ckpt), out, tokenizer=driver.tok_path, template=driver.cfg.data.template)
    return out


def execute(cfg: RunConfig, out: str | Path | None) -> tuple[Path, dict]:
    """Run GRPO into `out` (or a new run directory): (run directory, {"before", "after"} held-out results)."""
    from orchestrator.placement import check_shared_storage
    from orchestrator.ray_local import init_ray
    from orchestrator.report import write_grpo_report
    from orchestrator.tracking import start_follower, wandb_group

    validate(cfg)
    resolve_init(cfg)
    load_tasks(cfg)  # a bad task table or reward fails here, before any actor starts
    reward_config(cfg)
    run_dir = create_run_dir(cfg, out)
    print(f"grpo: run directory {run_dir}", flush=True)
    random.seed(cfg.seed)
    if cfg.grpo.runtime == "ray":  # one_process: no Ray, one machine (orchestrator/one_process.py)
        check_shared_storage(init_ray(cfg.cluster), run_dir)
    # The W&B run belongs to a detached follower of metrics.jsonl (and of the rollouts tables and
    # histograms beside it), as in pretraining: `ray job stop` sends SIGTERM to this process and all
    # its descendants, wandb's service included, which would lose what it had not written yet.
    follower = start_follower(run_dir, cfg.tracking, name=cfg.name, config=to_dict(cfg), job_type="grpo",
                              group=wandb_group(cfg.grpo.init), media="orchestrator.tracking:followed_media")
    try:
        result = _run(cfg, run_dir, follower is not None)
    except BaseException:  # the follower finishes the W&B run with what was logged
        if follower:
            follower.stop()
        raise
    write_grpo_report(run_dir)
    if follower and not follower.stop(wait_s=120):
        print(f"grpo: the W&B run is still being finished (log: {run_dir / 'wandb-follower.log'})", flush=True)
    return run_dir, result


def _run(cfg: RunConfig, run_dir: Path, followed: bool) -> dict:
    import dataclasses

    from orchestrator.tracking import Tracker

    with Tracker(run_dir, dataclasses.replace(cfg.tracking, wandb_mode="disabled"), name=cfg.name, followed=followed) as tracker, \
            Driver(cfg, run_dir, tracker) as driver:
        result = driver.run()
        figures = {"grpo_steps": driver.step, "policy_version": driver.version, "tokenizer": str(driver.tok_path)}
        if driver.step == cfg.grpo.steps:
            figures["hf_export"] = str(export_policy(driver, run_dir / "hf"))
        for when in ("before", "after"):
            res = result[when]
            if res is not None:
                figures[f"heldout_accuracy_{when}"] = res.greedy
                if res.sampled is not None:
                    figures[f"heldout_pass@1_{when}"] = res.sampled
        if result["after"] is not None:
            print(f"grpo: held-out accuracy after GRPO {result['after'].greedy:.3f} greedy"
                  + (f", pass@1 {result['after'].sampled:.3f} sampled" if result["after"].sampled is not None else ""), flush=True)
        tracker.summary(figures)
    return result


def run(cfg: RunConfig, cli_args) -> int:
    execute(cfg, cli_args.out)
    return 0


__all__ = ["Driver", "execute", "export_policy", "load_tasks", "resolve_init", "run"]
