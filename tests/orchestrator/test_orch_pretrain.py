"""Pretraining on Ray Train + DeepSpeed (real Ray, real DeepSpeed, gloo on CPU), run through the CLI.

Exact resume, ZeRO-2/3 with 2 workers (and expert parallel 2) against 1 worker, recovery from a killed worker,
`tracking.log_every`, export of a chosen step.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "data.math_docs=3000", "data.seq_len=64", "data.shard_docs=1500", "pretrain.micro_batch_size=4",
    "pretrain.warmup_steps=2", "pretrain.lr=3e-3", "tracking.wandb_mode=disabled", "cluster.num_cpus=2",
]


def sputnik(*args, cache, timeout=600, popen=False):
    env = {**os.environ, "SPUTNIK_CACHE": str(cache), "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "RAY_DEDUP_LOGS": "0"}
    cmd = [sys.executable, "-m", "orchestrator.cli", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step loss; a step logged twice (after a restart) keeps its last value."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["train/loss"]
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


STRAIGHT = ["pretrain", *SMALL, "pretrain.steps=16", "pretrain.checkpoint_every=4", "pretrain.workers=2"]


@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory):
    """16 steps on 2 workers with a checkpoint every 4, uninterrupted: the reference run of exact
    resume and of recovery from a killed worker (made once, read only)."""
    out = tmp_path_factory.mktemp("pretrain") / "straight"
    sputnik(*STRAIGHT, "--out", str(out), cache=cache)
    return out


ONE_WORKER = ["pretrain", *SMALL, "pretrain.steps=8", "pretrain.checkpoint_every=8", "pretrain.workers=1", "pretrain.micro_batch_size=8",
              "pretrain.zero_stage=1"]


@pytest.fixture(scope="module")
def one_worker(cache, tmp_path_factory):
    """8 steps of 8 rows on one worker (ZeRO-1): the reference of 2 workers under ZeRO 2/3 and expert
    parallel, and of FP8 (made once, read only)."""
    out = tmp_path_factory.mktemp("pretrain") / "one-worker"
    sputnik(*ONE_WORKER, "--out", str(out), cache=cache)
    return out


@pytest.mark.slow
@pytest.mark.ray
def test_exact_resume(tmp_path, cache, straight):
    sputnik(*STRAIGHT, "pretrain.stop_after=8", "--out", str(tmp_path / "resumed"), cache=cache)
    assert max(losses(tmp_path / "resumed")) == 8
    # Ray Train forgets its registration of the step-8 checkpoint (as when a worker dies between
    # writing its part and Ray registering the report): the complete checkpoint on disk is used
    (tmp_path / "resumed" / "checkpoints" / "train" / "checkpoint_manager_snapshot.json").unlink()
    r = sputnik(*STRAIGHT, "--out", str(tmp_path / "resumed"), cache=cache)
    assert "resumed from step 8, from the run directory" in r.stdout + r.stderr
    a, b = losses(straight), losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, 17))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])
    assert a[16] < a[1]  # and it learns
    # the exported model is a transformers checkpoint of the final weights
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(straight / "hf")
    assert hf.config.num_hidden_layers == 3


@pytest.mark.slow
@pytest.mark.ray
def test_fp8_pretraining_tracks_full_precision(tmp_path, cache, one_worker):
    """pretrain.fp8 (emulated on CPU) against the same run in fp32: the first 5 steps within 0.5%
    (but not equal: FP8 is on), every step within 3%, and it learns. Measured (2026-12-07):
    +0.01% to +0.37% at every step, step 8 at 0.597 of step 1 (early training at this lr is chaotic:
    a 12-step run with 4-row batches once had a one-step 11% bump that the FP8 run recovered from)."""
    r = sputnik(*ONE_WORKER, "pretrain.fp8=true", "--out", str(tmp_path / "fp8"), cache=cache)
    assert "FP8 block-scaled GEMMs in" in r.stdout + r.stderr
    a, b = losses(one_worker), losses(tmp_path / "fp8")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert any(a[s] != b[s] for s in a)
    for s in a:
        assert abs(a[s] - b[s]) <= (0.005 if s <= 5 else 0.03) * a[s], (s, a[s], b[s])
    assert b[8] < 0.65 * b[1]


@pytest.mark.slow
@pytest.mark.ray
def test_two_workers_zero2_zero3_and_expert_parallel_match_one_worker(tmp_path, cache, one_worker):
    common = ["pretrain", *SMALL, "pretrain.steps=8", "pretrain.checkpoint_every=8"]
    ref = losses(one_worker)
    # (workers, ZeRO stage, expert parallel) through the whole `sputnik pretrain` path; the other
    # combinations of world size, EP degree and ZeRO stage (4 workers, EP 4, ZeRO 1/2/3 under owned
    # experts) are tests/orchestrator/test_orch_expert_shard.py's, at a fraction of the time
    for workers, stage, ep in ((2, 3, 1), (2, 2, 2)):
        out = tmp_path / f"w{workers}z{stage}ep{ep}"
        r = sputnik(*common, f"pretrain.workers={workers}", f"pretrain.micro_batch_size={8 // workers}", f"pretrain.zero_stage={stage}",
                    f"pretrain.expert_parallel={ep}", "--out", str(out), cache=cache)
        assert (ep > 1) == ("expert parallel 2: each worker owns and computes 4 of 8" in r.stdout + r.stderr)
        got = losses(out)
        for step in ref:
            assert abs(got[step] - ref[step]) < 1e-4 * abs(ref[step]), (workers, stage, ep, step, got[step], ref[step])


@pytest.mark.slow
@pytest.mark.ray
def test_recovers_from_a_killed_worker(tmp_path, cache, straight):
    """A training worker killed (SIGKILL, from outside) after the first checkpoint: Ray Train
    restarts the group from the latest checkpoint and the run ends with the uninterrupted run's losses."""
    proc = sputnik(*STRAIGHT, "pretrain.max_failures=2", "--out", str(tmp_path / "killed"), cache=cache, popen=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    # step 5 logged: the step-4 checkpoint is complete, 11 steps are still to run
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.05)
    import psutil

    # this run's workers only (its embedded Ray's processes descend from it): another run on the
    # machine, a demo or a second test session, must not lose a worker to this test
    def is_worker(p) -> bool:
        try:
            return "RayTrainWorker" in " ".join(p.cmdline())
        except psutil.Error:  # gone meanwhile
            return False

    pids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True) if is_worker(p)]
    assert pids, "no Ray Train worker process of this run found"
    os.kill(max(pids), signal.SIGKILL)
    assert proc.wait(timeout=600) == 0, "".join(lines)[-3000:]
    reader.join(timeout=60)
    assert "resumed from step" in "".join(lines), "".join(lines)[-3000:]
    a, b = losses(straight), losses(tmp_path / "killed")
    assert sorted(b) == list(range(1, 17))
    for step in a:  # the steps after the checkpoint are run again, exactly
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])


@pytest.mark.slow
@pytest.mark.ray
def test_log_every_sets_the_logged_steps_and_export_takes_any_kept_step(tmp_path, cache):
    """tracking.log_every=3 over 7 steps: records and progress lines at steps 3, 6 and the last, 7.
    The run keeps its last 2 checkpoints (6, 7); `sputnik export --step 6` exports the older one,
    `--step 3` names the kept steps."""
    run = tmp_path / "run"
    r = sputnik("pretrain", *SMALL, "pretrain.steps=7", "pretrain.checkpoint_every=3", "pretrain.workers=1",
                "tracking.log_every=3", "--out", str(run), cache=cache)
    assert sorted(losses(run)) == [3, 6, 7]
    # everything a later command needs is in the run directory, the tokenizer included
    summary = json.loads((run / "summary.json").read_text())
    assert Path(summary["tokenizer"]).resolve() == (run / "tokenizer.json").resolve()
    assert (run / "tokenizer.json").read_bytes() == next(Path(cache).rglob("tokenizer.json")).read_bytes()
    out = r.stdout + r.stderr
    assert all(f"step {s}/7 loss" in out for s in (3, 6, 7)) and "step 1/7 loss" not in out
    r = sputnik("export", "--from", str(run), "--step", "6", "--to", str(tmp_path / "step6"), cache=cache)
    assert "step 6 of pretrain run" in r.stdout
    from safetensors.torch import load_file

    step6, final = load_file(tmp_path / "step6" / "model.safetensors"), load_file(run / "hf" / "model.safetensors")
    assert step6.keys() == final.keys() and any(not step6[k].equal(final[k]) for k in final)
    env = {**os.environ, "SPUTNIK_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    bad = subprocess.run([sys.executable, "-m", "orchestrator.cli", "export", "--from", str(run), "--step", "3", "--to", str(tmp_path / "x")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "(have: 6, 7)" in bad.stderr, bad.stderr[-2000:]


def test_bad_config_fails_before_workers_start(tmp_path, cache):
    env = {**os.environ, "SPUTNIK_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    for override, msg in [
        ("pretrain.warmup_steps=500", "pretrain.warmup_steps"),
        ("data.seq_len=100000", "data.seq_len"),
        ("data.user_files=[/nonexistent/*.txt]", "matches no file"),
        ("model.vocab=100", "model.vocab"),
        ("pretrain.expert_parallel=3", "'pretrain.expert_parallel' (3) must divide pretrain.workers"),
    ]:
        r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "pretrain", *SMALL, override, "--out", str(tmp_path / "x")],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and msg in r.stderr, (override, r.stderr[-2000:])
        assert "RayTrainWorker" not in r.stdout + r.stderr


@contextlib.contextmanager
def one_rank_group():
    """A one-rank gloo default group for in-process DeepSpeed engines. Made once and kept for the
    process, as the in-process learner tests do: DeepSpeed keeps the group it first saw, and a group
    destroyed and made again is one it no longer knows."""
    import torch
    import torch.distributed as dist

    from orchestrator.dist_local import free_port, join_local_group

    if not dist.is_initialized():
        join_local_group(0, 1, free_port(), threads=torch.get_num_threads())
    assert dist.get_world_size() == 1
    yield


class Rows:
    """Fixed batches of 4 rows x 32 tokens of a 97-token vocabulary, one per step."""

    step = 0

    def __next__(self):
        import torch

        self.step += 1
        t = torch.randint(0, 97, (4, 33), generator=torch.Generator().manual_seed(self.step))
        return {"tokens": t[:, :-1], "targets": t[:, 1:]}


def worker_spec(tmp_path, p, **kw):
    from model import load_model_args
    from orchestrator.config import TrackingConfig
    from orchestrator.pretrain_worker import WorkerSpec

    return WorkerSpec(pretrain=p, model=load_model_args("tiny", vocab=97), tracking=TrackingConfig(), seed=0, run_name="t",
                      run_dir=tmp_path, shard_dir=tmp_path, seq_len=32, bos_id=1, eos_id=2, **kw)


def test_compiled_pretraining_step_makes_the_eager_losses(tmp_path):
    """pretrain.compile (issue 24): the worker's model with its loss compiled as one graph
    (aot_eager: the graphs inductor compiles, without code generation), under the real DeepSpeed
    engine (ZeRO-2, one gloo rank), gives the eager losses over 3 steps; refused where it cannot hold."""
    import torch
    from torch._dynamo.utils import counters

    from orchestrator.config import ConfigError, PretrainConfig, load_config
    from orchestrator.pretrain import validate
    from orchestrator.pretrain_worker import build_engine, build_model, train_step

    losses = {}
    with one_rank_group():
        for compiled in (False, True):
            p = PretrainConfig(micro_batch_size=4, zero_stage=2, steps=10, warmup_steps=1, compile=compiled, compile_backend="aot_eager")
            model = build_model(worker_spec(tmp_path, p), 0, 1)
            engine, _ = build_engine(model, p, 1, bf16=False)
            counters.clear()
            rows = Rows()
            losses[compiled] = [train_step(engine, model, rows, 1, torch.device("cpu"), 1)[0]["loss"] for _ in range(3)]
            assert (counters["stats"]["unique_graphs"] > 0) == compiled and not counters["graph_break"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    for over in (["pretrain.zero_stage=3"], ["pretrain.fp8=true"], ["pretrain.activation_checkpointing=true"]):
        with pytest.raises(ConfigError, match="pretrain.compile"):
            validate(load_config(None, ["pretrain.compile=true", *over]))


@pytest.mark.parametrize("source", ["export", "fp8-hub", "no-mtp"])
def test_a_zero3_worker_from_an_hf_directory_is_built_partitioned(tmp_path, source):
    """SFT / pretraining from an HF directory under ZeRO-3 (issue 19): the worker's model is built
    partitioned as it is read (every parameter a DeepSpeed partition from the start), holds the
    checkpoint's weights, counts its parameters as the whole model (MFU), and trains as the same
    weights loaded whole (ZeRO-2) do; from our export, from the FP8 hub-layout checkpoint (3 shards,
    e4m3 with block scales, MTP: tests/hf_hub_checkpoint.py), and from an export without MTP layers
    (as transformers saves them), whose MTP module starts fresh, as the plain import's does."""
    import dataclasses
    import importlib.util

    import deepspeed
    import torch

    from model import Transformer, load_model_args
    from model.hf import from_hf_pretrained, hf_model_args, save_hf_pretrained
    from orchestrator.config import PretrainConfig
    from orchestrator.pretrain_worker import build_engine, build_model, train_step

    if source in ("export", "no-mtp"):
        torch.manual_seed(3)
        hf = tmp_path / "hf"
        save_hf_pretrained(Transformer(load_model_args("tiny", vocab=97)), hf, mtp="separate" if source == "export" else "none")
    else:
        spec_ = importlib.util.spec_from_file_location("hf_hub_checkpoint", REPO / "tests" / "hf_hub_checkpoint.py")
        hub = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(hub)
        hf, _, _ = hub.make_hub_checkpoint(tmp_path / "hub")
    want = from_hf_pretrained(hf)
    losses = {}
    with one_rank_group():
        for stage in (2, 3):
            p = PretrainConfig(micro_batch_size=4, zero_stage=stage, steps=10, warmup_steps=1)
            spec = dataclasses.replace(worker_spec(tmp_path, p, init_dir=hf), model=hf_model_args(hf))  # the init's model, as SFT runs it
            model = build_model(spec, 0, 1)
            assert all(hasattr(q, "ds_tensor") for q in model.parameters()) == (stage == 3)
            assert model.num_parameters(activated=True) == want.num_parameters(activated=True)
            engine, _ = build_engine(model, p, 1, bf16=False)
            if stage == 3:
                with deepspeed.zero.GatheredParameters(list(model.parameters())):
                    got = {k: v.detach().clone() for k, v in model.state_dict().items()}
                fresh = source == "no-mtp"  # MTP drawn afresh: its own random values
                assert all(torch.equal(got[k], v) for k, v in want.state_dict().items() if not (fresh and k.startswith("mtp.")))
                if fresh:
                    mtp = {k: v for k, v in got.items() if k.startswith("mtp.") and k.endswith(".weight")}
                    assert all((v == 1).all() if k.endswith("norm.weight") else 0.01 < v.std() < 0.03 for k, v in mtp.items())
            rows = Rows()
            losses[stage] = [train_step(engine, model, rows, 1, torch.device("cpu"), 1)[0]["loss"] for _ in range(2)]
    if source != "no-mtp":
        assert losses[3] == pytest.approx(losses[2], rel=1e-5)
