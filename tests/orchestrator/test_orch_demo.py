"""`sputnik demo` end to end with the demo config: GRPO raises held-out accuracy on arithmetic and
on the programming tasks, the report and summary hold the figures and plots, and a second demo
reuses the tokenizer and shards.

This is also the "GRPO learns" test of the loop: pretraining (600 steps, 2 DeepSpeed workers) on
the synthetic corpus (two-digit addition and "write f(x) returning x plus a plus b", half of the
solutions worked), then 20 GRPO steps on the arithmetic train split and 10 on the programming
train split (scored in the sandbox), then pass@1 at temperature 1 (4 samples per task) on 128
arithmetic and 64 programming held-out prompts that appear neither in pretraining nor in GRPO
training. Measured (seed 0, 2026-12-04): arithmetic 0.551 -> 0.914, code 0.551 -> 0.945 (greedy
0.859 -> 0.984 and 0.875 -> 1.000); other runs and seed 1 in BENCHMARKS.md, "Demo". The standard error of one pass@1 on 128
tasks is at most 0.044 (on 64, 0.063; less with 4 samples each), so the asserted rise of 0.2 is
more than two standard errors of the difference even for the code tasks.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICK = ["demo.code_steps=0", "pretrain.steps=3", "pretrain.warmup_steps=1", "pretrain.checkpoint_every=3", "grpo.steps=1", "grpo.heldout_size=8",
         "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.eval_every=1", "rollout.max_new_tokens=32"]


def demo(out: Path, cache: Path, *overrides, timeout=1500) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPUTNIK_CACHE": str(cache), "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "demo", "--out", str(out), *overrides],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1800)
def test_demo_grpo_raises_heldout_accuracy_and_reuses_corpus(tmp_path):
    cache = tmp_path / "cache"
    first = demo(tmp_path / "a", cache)
    run = tmp_path / "a"
    summary = json.loads((run / "summary.json").read_text())
    before, after = summary["heldout_accuracy_before"]["arithmetic"], summary["heldout_accuracy_after"]["arithmetic"]
    assert after - before >= 0.2, (before, after)
    # R1-Zero in miniature: the policy learns to choose reasoning
    assert summary["heldout_reasoning_fraction_after"]["arithmetic"] > summary["heldout_reasoning_fraction_before"]["arithmetic"]
    report = (run / "report.md").read_text()
    assert f"{before:.3f} before GRPO, {after:.3f} after" in report
    for name in ("loss", "reward", "heldout_accuracy", "expert_load", "time"):
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plots/{name}.png" in report
    for part in ("pretrain", "grpo", "grpo-code"):  # offline W&B runs inside the run directory
        assert list((run / part / "wandb").glob("offline-run-*")), part
    losses = [json.loads(l)["train/loss"] for l in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 600 and losses[-1] < losses[0]
    grpo_steps = [json.loads(l) for l in (run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in grpo_steps if "reward/mean" in r] == list(range(1, 21))
    # the programming stage: sandboxed code_tests rewards, held-out pass@1 on the code tasks raised
    # (measured 0.523 -> 0.883, seed 0; most of it in the arithmetic stage, whose lesson carries over)
    assert summary["heldout_tasks"]["code"] == 64
    code_before, code_after = summary["heldout_accuracy_before"]["code"], summary["heldout_accuracy_after"]["code"]
    assert code_after - code_before >= 0.2, (code_before, code_after)
    code_steps = [json.loads(l) for l in (run / "grpo-code" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in code_steps if "reward/mean" in r] == list(range(1, 11))
    assert all("reward/code_tests/mean" in r for r in code_steps if "reward/mean" in r)
    assert "## Stage by stage" in report and "after code GRPO: arithmetic" in report
    out = first.stdout + first.stderr
    assert "training a" in out and "after GRPO" in out
    # noise a clean run printed before: reward workers' teardown exit (a traceback), Ray Train's
    # placement group cleaner without the State API (every second), DeepSpeed's deprecated all-gather
    for noise in ("SystemExit", "Failed to query Ray Train Controller", "all_gather_into_tensor"):
        assert noise not in out, noise
    second = demo(tmp_path / "b", cache, *QUICK, timeout=900)
    out2 = second.stdout + second.stderr
    assert "reusing tokenizer" in out2 and "reusing" in out2 and "tokenised shards" in out2
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["grpo_steps"] == {"arithmetic": 1}
