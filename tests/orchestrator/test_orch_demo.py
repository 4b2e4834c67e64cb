"""`sputnik demo` end to end on a shortened config: report, summary figures, reuse of the corpus."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHORT = ["data.math_docs=3000", "data.shard_docs=1500", "pretrain.steps=30", "pretrain.micro_batch_size=4",
         "pretrain.checkpoint_every=30", "grpo.heldout_size=16", "rollout.max_new_tokens=48", "tracking.wandb_mode=offline"]


def demo(out: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPUTNIK_CACHE": str(cache), "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "demo", "--out", str(out), *SHORT],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.slow
@pytest.mark.ray
def test_demo_reports_and_reuses_corpus(tmp_path):
    cache = tmp_path / "cache"
    first = demo(tmp_path / "a", cache)
    run = tmp_path / "a"
    summary = json.loads((run / "summary.json").read_text())
    acc = summary["heldout_accuracy_before"]["arithmetic"]
    assert 0.0 <= acc <= 1.0 and summary["heldout_accuracy_after"] is None  # GRPO has not landed
    frac = summary["heldout_reasoning_fraction_before"]["arithmetic"]
    assert 0.0 <= frac <= 1.0
    report = (run / "report.md").read_text()
    assert "GRPO (issue #8)" in report and f"{acc:.3f}" in report
    assert list((run / "wandb").glob("offline-run-*"))  # an offline W&B run inside the run directory
    losses = [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and losses[-1] < losses[0]
    out = first.stdout + first.stderr
    assert "training a" in out and "GRPO" in out and "not available yet" in out
    second = demo(tmp_path / "b", cache)
    out2 = second.stdout + second.stderr
    assert "reusing tokenizer" in out2 and "reusing 2 tokenised shards" in out2
