"""`sputnik sft` end to end (issue 22): a tiny random policy fine-tuned on worked sums through Ray
Train + DeepSpeed, stopped halfway and resumed with the same --out (its losses those of an
uninterrupted run); held-out loss and token
accuracy on completion tokens; the export loads in transformers and continues a held-out prompt
as our model does. Bad input exits 2 in one line naming the row, before Ray starts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def sft_table(path: Path, n: int = 600) -> Path:
    from data.synthetic import problems
    from data.tasks import split_of

    rows = []
    for p in problems(n, 5, families=("add",), digits=2):
        rows.append({"prompt": p.prompt, "completion": f" {p.reasoning}</think> <answer>{p.answer}</answer>",
                     "split": split_of(p.prompt, 10)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sputnik(*args, cwd=REPO, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_bad_row_exits_2_naming_it_before_ray(tmp_path, policy_dir):
    root, _ = policy_dir
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "What is 1 + 1?", "completion": "2"}\n{"prompt": "What is 2 + 2?"}\n')
    r = sputnik("sft", f"sft.init={root / 'hf'}", f"sft.tokenizer={root / 'tokenizer.json'}", f"sft.data={bad}",
                "--out", str(tmp_path / "run"), timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "bad.jsonl: row 1 needs a non-empty string 'completion'" in r.stderr
    assert "Ray" not in r.stdout + r.stderr
    r = sputnik("sft", f"sft.data={bad}", timeout=120)
    assert r.returncode == 2 and "'sft.init' is required" in r.stderr
    small = sft_table(tmp_path / "small.jsonl", 30)  # a few rows: fewer packed rows than one batch
    r = sputnik("sft", f"sft.init={root / 'hf'}", f"sft.tokenizer={root / 'tokenizer.json'}", f"sft.data={small}", "sft.micro_batch_size=64",
                "--out", str(tmp_path / "run2"), timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert f"key 'sft.data' ({small}) with sft.micro_batch_size 64 x sft.workers 1:" in r.stderr and "fewer than one batch of 64" in r.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_sft_learns_worked_sums_resumes_and_exports(tmp_path, policy_dir):
    root, tok = policy_dir
    table = sft_table(tmp_path / "sums.jsonl")
    out = tmp_path / "run"
    args = ["sft", f"sft.init={root / 'hf'}", f"sft.tokenizer={root / 'tokenizer.json'}", f"sft.data={table}", "sft.steps=40",
            "sft.lr=3e-3", "sft.warmup_steps=2", "sft.checkpoint_every=10", "sft.eval_every=10", "sft.zero_stage=1",
            "data.seq_len=128", "cluster.num_cpus=2", "tracking.wandb_mode=disabled"]
    first = sputnik(*args, "sft.stop_after=20", "--out", str(out))
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    second = sputnik(*args, "--out", str(out))
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    assert "sft: resumed from step 20" in log
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 41))  # each step once, across the stop
    evals = [(r["step"], r["eval/loss"], r["eval/token_accuracy"]) for r in recs if "eval/loss" in r]
    assert [e[0] for e in evals] == [10, 20, 30, 40]
    print("held-out (step, loss, token accuracy):", evals)
    # measured: loss 2.51 -> 1.23, token accuracy 0.41 -> 0.61 from step 10 to 40 (a random model starts near 1/512)
    assert evals[-1][1] < 0.7 * evals[0][1] and evals[-1][2] > evals[0][2] + 0.15, evals
    # resume exactness: an uninterrupted run of the same schedule, to step 24, has the same losses
    ref = tmp_path / "ref"
    r = sputnik(*args, "sft.stop_after=24", "--out", str(ref))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    ref_loss = {x["step"]: x["train/loss"] for x in map(json.loads, (ref / "metrics.jsonl").read_text().splitlines())}
    got = {x["step"]: x["train/loss"] for x in recs}
    assert [got[s] for s in range(1, 25)] == pytest.approx([ref_loss[s] for s in range(1, 25)], rel=1e-5), (got, ref_loss)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heldout_token_accuracy"] == evals[-1][2] and (out / "report.md").is_file()

    # the export: transformers' logits equal ours on a held-out prompt continued by its completion
    from transformers import AutoModelForCausalLM

    from model.hf import from_hf_pretrained

    row = next(json.loads(line) for line in table.read_text().splitlines() if json.loads(line)["split"] == "heldout")
    ids = torch.tensor([tok.prompt_ids(row["prompt"], "r1") + tok.encode(row["completion"])])
    ours = from_hf_pretrained(out / "hf").eval()
    theirs = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
