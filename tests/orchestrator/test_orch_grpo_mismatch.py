"""Issue 20 on real Ray actors and a real DeepSpeed learner (gloo on CPU): a GRPO run in async mode
with `grpo.max_lag=2` samples at most two policy versions behind (the lag per step is recorded),
and with `rollout.exact=true` the mismatch meter reads exactly 0 on the samples of the learner's own
version, logged to metrics.jsonl with the importance correction's figures and summarised in the report."""

import json
from pathlib import Path

import pytest


def per_step(run_dir: Path, key: str) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in recs if key in r}


@pytest.mark.ray
def test_async_max_lag_exact_mode_and_the_meter_in_metrics(policy_dir, tmp_path):
    from orchestrator.config import load_config
    from orchestrator.grpo import Driver
    from orchestrator.ray_local import init_ray
    from orchestrator.report import write_grpo_report
    from orchestrator.tracking import Tracker

    root, _ = policy_dir
    cfg = load_config(None, [
        f"grpo.init={root / 'hf'}", f"grpo.tokenizer={root / 'tokenizer.json'}", "grpo.prompts_per_step=2",
        "grpo.group_size=4", "grpo.heldout_size=2", "grpo.heldout_samples=0", "grpo.train_size=64", "rollout.max_new_tokens=16",
        "tracking.wandb_mode=disabled", "cluster.num_cpus=2", "grpo.mode=async", "grpo.max_lag=2", "grpo.steps=3",
        "grpo.eval_every=3", "grpo.checkpoint_every=3", "rollout.exact=true", "grpo.importance=tis", "grpo.router_replay=true",
    ])
    ray = init_ray(cfg.cluster)
    try:
        tracker = Tracker(tmp_path, cfg.tracking, name="t")
        with Driver(cfg, tmp_path, tracker) as d:
            d.run()
        tracker.close()
    finally:
        ray.shutdown()
    assert per_step(tmp_path, "rollout/version_lag") == {1: 0.0, 2: 1.0, 3: 2.0}
    assert per_step(tmp_path, "rollout/version_lag_max") == {1: 0, 2: 1, 3: 2}
    # step 1 samples the learner's own version: exact agreement; later steps' samples are of older
    # versions, measured apart (the gap there includes any policy change) and corrected by TIS
    assert per_step(tmp_path, "mismatch/logprob_abs_max") == {1: 0.0}
    assert per_step(tmp_path, "mismatch/routing_frac") == {1: 0.0}
    assert set(per_step(tmp_path, "mismatch/lagged/logprob_abs_mean")) == {2, 3}
    assert set(per_step(tmp_path, "is/weight_mean")) == {1, 2, 3} and per_step(tmp_path, "is/ratio_mean")[1] == 1.0
    (tmp_path / "summary.json").write_text("{}")
    assert "sampler/learner mismatch: mean |delta log-prob| 0.00e+00" in write_grpo_report(tmp_path).read_text()


@pytest.mark.parametrize("override, message", [
    ("grpo.importance=is", "key 'grpo.importance' has invalid value 'is': input should be 'none', 'tis' or 'mis'"),
    ("grpo.is_cap=0.5", "key 'grpo.is_cap' has invalid value 0.5: input should be greater than 1"),
    ("grpo.max_lag=0", "key 'grpo.max_lag' has invalid value 0"),
])
def test_bad_values_are_one_line_errors_naming_the_key(override, message):
    from orchestrator.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["grpo.max_lag=3"], "key 'grpo.max_lag' (3) applies to grpo.mode=async only"),
    (["rollout.exact=true", "grpo.zero_stage=3"], "key 'rollout.exact' needs whole weights"),
])
def test_option_combinations_refused_before_any_actor_starts(tmp_path, overrides, message):
    from orchestrator.config import ConfigError, load_config
    from orchestrator.grpo import Driver

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Driver(load_config(None, overrides), tmp_path, tracker=None)
