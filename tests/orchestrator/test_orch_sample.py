"""Rejection sampling (orchestrator/sample.py, issue 22): what is kept is exactly what the verifier
accepts. A deterministic teacher (scripted completions per task: right, wrong, right but cut by
the token budget, repeated, shorter) scored by the real reward workers' code (RewardWorker, the
same verdicts GRPO trains on); the reference is the task's answer compared by hand."""

import re

import pytest

from orchestrator.config import load_config
from orchestrator.grpo.rollout import RewardWorker, RolloutChunk
from orchestrator.grpo.inputs import reward_config
from orchestrator.sample import select_completions


def teacher(task: dict, i: int) -> list[tuple[str, bool]]:
    """(completion, cut by the token budget) x 5 for task i: a different mix per task."""
    a = int(task["answer"])
    right = f" worked {a}</think> <answer>{a}</answer>"
    short = f"</think> <answer>{a}</answer>"
    wrong = f" worked</think> <answer>{a + 1}</answer>"
    mixes = [
        [(right, False), (wrong, False), (right, True), (right, False), (short, False)],  # repeated right, a shorter right
        [(wrong, False)] * 5,  # none accepted: listed as rejected
        [(right, True)] * 4 + [(wrong, False)],  # right only when cut: rejected
        [(wrong, False), (short, False), (wrong, False), (wrong, False), (right, False)],
    ]
    return mixes[i % len(mixes)]


@pytest.mark.parametrize("keep", ["all", "shortest", "distinct"])
def test_rejection_sampling_keeps_exactly_what_the_verifier_accepts(keep):
    from data.tasks import generate_arithmetic

    cfg = load_config(None, [])
    tasks = generate_arithmetic(8, seed=3, families=("add",), digits=2, split="train").to_pylist()
    scripted = [teacher(t, i) for i, t in enumerate(tasks)]
    flat = [(t, c, cut) for t, s in zip(tasks, scripted) for c, cut in s]
    chunk = RolloutChunk(tasks=[t for t, _, _ in flat], groups=[i for i, s in enumerate(scripted) for _ in s],
                         prompt_ids=[[1] for _ in flat], completion_ids=[[2] * len(c.split()) for _, c, _ in flat],
                         completions=[c for _, c, _ in flat], truncated=[cut for _, _, cut in flat], versions=[0] * len(flat),
                         seconds=0.0, tokens=0)
    worker = RewardWorker(reward_config(cfg), max_len=64)
    try:
        records = worker.score(chunk).records
    finally:
        worker.close()
    kept, rejected = select_completions(tasks, 5, chunk.completions, records, keep=keep, max_per_prompt=3, teacher="t")

    def accepted(task, text, cut):  # the reference: the one answer, equal to the task's, and not cut short
        found = re.findall(r"<answer>(.*?)</answer>", text)
        return not cut and found == [task["answer"]]

    for i, (task, script) in enumerate(zip(tasks, scripted)):
        ok = [(text, records[i * 5 + j].length) for j, (text, cut) in enumerate(script) if accepted(task, text, cut)]
        mine = [r["completion"] for r in kept if r["task_id"] == task["id"]]
        if not ok:
            assert task["id"] in [r["id"] for r in rejected] and not mine
            continue
        assert task["id"] not in [r["id"] for r in rejected]
        if keep == "all":
            assert mine == [t for t, _ in ok][:3]
        elif keep == "shortest":
            assert mine == [min(ok, key=lambda x: x[1])[0]]
        else:
            distinct = sorted(set(t for t, _ in ok), key=lambda t: min(n for s, n in ok if s == t))
            assert mine == distinct[:3] and len(set(mine)) == len(mine)
        assert all(r["reward"] >= 1.0 and r["teacher"] == "t" and r["split"] == "train" for r in kept if r["task_id"] == task["id"])
    assert len(rejected) == 4  # tasks 1, 2, 5, 6 of the mixes


def test_sample_in_one_process_scores_every_completion_without_ray(policy_dir, tmp_path):
    """`sputnik sample grpo.runtime=one_process`: the teacher's sampler and the reward worker in the
    command's process (no Ray started: no Ray session directory appears); every prompt is accounted
    for, kept or rejected, and the sample count is prompts x samples."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    root, _ = policy_dir
    env = {**os.environ, "PYTHONPATH": str(repo), "DS_ACCELERATOR": "cpu", "RAY_TMPDIR": str(tmp_path / "ray")}
    out = tmp_path / "s"
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sample", f"sample.teacher={root / 'hf'}",
                        f"sample.tokenizer={root / 'tokenizer.json'}", "sample.prompts=6", "sample.samples=3", "sample.batch_prompts=4",
                        "rollout.max_new_tokens=12", "grpo.runtime=one_process", "tracking.wandb_mode=disabled", "--out", str(out)],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "sample: sampler and reward worker in this process (grpo.runtime=one_process" in r.stdout
    assert not (tmp_path / "ray").exists()
    summary = json.loads((out / "summary.json").read_text())
    kept = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    rejected = [json.loads(l) for l in (out / "rejected.jsonl").read_text().splitlines()]
    assert summary["samples"] == 6 * 3 and summary["prompts_rejected"] == len(rejected)
    assert len({k["task_id"] for k in kept}) + len(rejected) == 6 == summary["prompts_kept"] + summary["prompts_rejected"]
