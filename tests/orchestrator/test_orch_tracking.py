"""Tracker: metrics.jsonl records, which steps a loop logs, summary.json, and a real offline W&B run
inside the run directory."""

import json
import math
import time

import pytest

from orchestrator.config import TrackingConfig
from orchestrator.tracking import Tracker, progress


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_jsonl_without_wandb(tmp_path):
    import torch

    with Tracker(tmp_path, TrackingConfig(wandb_mode="disabled"), name="t") as tr:
        tr.log({"loss": 2.5, "lr": torch.tensor(1e-3), "n": 3, "bad": float("nan"), "obj": object()}, step=1)
        tr.log({"loss": 2.0}, step=2)
        tr.summary({"final_loss": 2.0})
        tr.summary({"extra": 1})
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all("time" in r and r["time"] >= 0 for r in rows)
    assert rows[0]["loss"] == 2.5 and math.isclose(rows[0]["lr"], 1e-3, rel_tol=1e-6) and rows[0]["n"] == 3
    assert rows[0]["bad"] == "nan"  # non-finite values stay valid JSON
    assert "obj" not in rows[0]  # non-scalars are W&B-only
    assert json.loads((tmp_path / "summary.json").read_text()) == {"final_loss": 2.0, "extra": 1}


def test_offline_wandb_run_lives_in_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-that-must-not-leak-0000000000")
    cfg = TrackingConfig(wandb_mode="offline", tags=["unit"])
    tr = Tracker(tmp_path, cfg, name="unit-run", config={"a": 1})
    assert tr.wandb_run is not None
    assert tr.wandb_run.name == "unit-run" and list(tr.wandb_run.tags) == ["unit"]
    assert tr.wandb_run.config["a"] == 1
    for step in range(3):
        tr.log({"loss": 1.0 / (step + 1)}, step=step)
    tr.summary({"final": 0.33})
    tr.close()
    wandb_dir = tmp_path / "wandb"
    runs = list(wandb_dir.glob("offline-run-*"))
    assert len(runs) == 1, list(wandb_dir.iterdir())
    # The API key is never written anywhere in the run directory.
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert b"secret-key-that-must-not-leak" not in f.read_bytes(), f


def test_progress_is_plain_iteration_without_tty(capsys):
    assert list(progress(range(5), description="x")) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_step_is_recorded_in_every_mode(tmp_path, mode):
    with Tracker(tmp_path, TrackingConfig(wandb_mode=mode), name="s") as tr:
        tr.log({"x": 1}, step=7)
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["step"] == 7


def test_should_log_every_log_every_steps_and_the_last(tmp_path):
    with Tracker(tmp_path, TrackingConfig(wandb_mode="disabled", log_every=3), name="s") as tr:
        assert [s for s in range(1, 9) if tr.should_log(s, last=8)] == [3, 6, 8]
        assert [s for s in range(5, 10) if tr.should_log(s, last=9)] == [6, 9]  # a resumed loop
    with Tracker(tmp_path, TrackingConfig(wandb_mode="disabled"), name="s") as tr:
        assert all(tr.should_log(s, last=4) for s in range(1, 5))


def test_a_resumed_run_keeps_its_wandb_run_and_one_record_per_step(tmp_path):
    """A second Tracker on the same run directory continues the same W&B run (the id is kept in the
    run directory), and drop_after(step) removes what a stopped run logged past its checkpoint."""
    cfg = TrackingConfig(wandb_mode="offline")
    with Tracker(tmp_path, cfg, name="t") as t:
        for step in (1, 2, 3):
            t.log({"loss": float(step)}, step=step)
        first = t.wandb_run.id
    with Tracker(tmp_path, cfg, name="t") as t:
        assert t.wandb_run.id == first
        assert t.drop_after(1) == 2
        for step in (2, 3):
            t.log({"loss": 10.0 + step}, step=step)
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 1.0), (2, 12.0), (3, 13.0)]


def test_a_grpo_run_joins_the_wandb_group_of_the_run_it_starts_from(tmp_path):
    from orchestrator.tracking import wandb_group

    cfg = TrackingConfig(wandb_mode="offline")
    with Tracker(tmp_path / "pre", cfg, name="pretrain-x"):
        pass
    assert wandb_group(tmp_path / "pre") == wandb_group(tmp_path / "pre" / "hf") == "pretrain-x"
    with Tracker(tmp_path / "grpo", cfg, name="grpo-y", group=wandb_group(tmp_path / "pre" / "hf")) as t:
        assert t.wandb_run.group == "pretrain-x"
        t.histograms({"rollout/response_length": [3, 5, 8]}, step=1)
    assert wandb_group(tmp_path / "nowhere") is None


def test_follower_sends_each_written_step_once_across_a_stop_and_a_resume(tmp_path):
    """The driver's MetricsFollower and a worker's followed Tracker, as in pretraining: every record
    written before the follower closes reaches the offline W&B run (read back from wandb's file),
    nothing can be written after it closed, and a resumed follower continues the same W&B run with
    the steps after the last one sent, though the resumed worker rewrote steps 3-4."""
    import wandb

    from orchestrator.tracking import FollowerClosed, MetricsFollower
    from orchestrator.wandb_offline import offline_history

    cfg = TrackingConfig(wandb_mode="offline")
    follower = MetricsFollower(tmp_path, cfg, name="f", poll_s=0.05)
    worker = Tracker(tmp_path, TrackingConfig(wandb_mode="disabled"), name="f", followed=True)
    for step in (1, 2, 3, 4):
        worker.log({"loss": float(step)}, step=step)
    follower.close()  # the stop: what was written is sent, the run finished
    wandb.teardown()  # the run file is complete once wandb's service has stopped (as the detached follower does)
    with pytest.raises(FollowerClosed):
        worker.log({"loss": 5.0}, step=5)
    worker.close()
    assert [(r["_step"], r["loss"]) for r in offline_history(tmp_path)] == [(1, 1), (2, 2), (3, 3), (4, 4)]
    run_id = (tmp_path / "wandb-run-id").read_text()
    time.sleep(1.1)  # wandb names an offline run's directory by the second it started

    follower = MetricsFollower(tmp_path, cfg, name="f", poll_s=0.05)
    worker = Tracker(tmp_path, TrackingConfig(wandb_mode="disabled"), name="f", followed=True)
    worker.drop_after(2)  # resumed from the checkpoint at step 2
    for step in (3, 4, 5, 6):
        worker.log({"loss": 10.0 + step}, step=step)
    worker.close()
    follower.close()
    wandb.teardown()
    assert (tmp_path / "wandb-run-id").read_text() == run_id
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert [(r["_step"], r["loss"]) for r in offline_history(tmp_path)] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 15), (6, 16)]
