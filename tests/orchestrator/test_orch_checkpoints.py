"""`sputnik export` from a GRPO run: checkpoints written by a real DeepSpeed engine (1 gloo rank on
CPU, ZeRO 0 and 3) in the GRPO layout, found, gathered and loaded back by transformers with the
weights and logits of the source; a head tied to the embedding, which ZeRO saves once, comes back;
incomplete checkpoints and bad arguments are refused in one line."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from orchestrator.checkpoints import find_checkpoints
from orchestrator.config import load_config
from orchestrator.dist_local import free_port
from orchestrator.rundir import create_run_dir

REPO = Path(__file__).resolve().parents[2]


def sputnik(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


class Policy(nn.Module):
    """Wraps the Transformer as `.model`, as the GRPO learner's engine module does."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, targets):
        return self.model.loss(tokens, targets)[0]


def write_grpo_checkpoints(rank: int, port: int, hf_dir: str, run_dir: str, stage: int) -> None:
    """Two learner steps saved in the GRPO layout; only step 1 gets its marker (step 2 is a save cut
    short). The full source weights of each step go to source{step}.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(1)
    from model.hf import from_hf_pretrained
    from orchestrator.ds_config import deepspeed_config, import_deepspeed

    deepspeed = import_deepspeed()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    torch.manual_seed(0)
    policy = from_hf_pretrained(hf_dir)
    ds_cfg = deepspeed_config(micro_batch_size=2, grad_accum=1, world_size=1, zero_stage=stage, lr=1e-2,
                              betas=(0.9, 0.99), weight_decay=0.0, grad_clip=1.0, bf16=False)
    engine, *_ = deepspeed.initialize(model=Policy(policy), model_parameters=policy.parameters(), config=ds_cfg)
    ckpt = Path(run_dir) / "checkpoints"
    for step in (1, 2):
        tokens = torch.randint(0, policy.args.vocab, (2, 17))
        engine.backward(engine(tokens[:, :-1], tokens[:, 1:]))
        engine.step()
        tag = f"step{step:06d}"
        engine.save_checkpoint(str(ckpt / "learners"), tag=tag, client_state={"version": step, "step": step})
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # whole weights under ZeRO-3
            torch.save({k: v.detach().clone() for k, v in engine.module.model.state_dict().items()}, Path(run_dir) / f"source{step}.pt")
        if step == 1:
            (ckpt / f"{tag}.json").write_text(json.dumps({"step": step, "version": step, "data_position": 8, "tag": tag}))


@pytest.fixture(scope="module")
def grpo_run(policy_dir, tmp_path_factory):
    """grpo_run(stage) -> a GRPO run directory (made once per ZeRO stage) whose init is the tiny policy."""
    runs = {}

    def make(stage: int) -> Path:
        if stage not in runs:
            hf = policy_dir[0] / "hf"
            # the `model:` section says dim 64; the policy (and so the checkpoint) has the init's dim 128
            cfg = load_config(None, [f"grpo.init={hf}", "model.dim=64", f"name=grpo-z{stage}"])
            run = create_run_dir(cfg, tmp_path_factory.mktemp(f"grpo-z{stage}") / "run")
            mp.spawn(write_grpo_checkpoints, args=(free_port(), str(hf), str(run), stage), nprocs=1, join=True)
            runs[stage] = run
        return runs[stage]

    return make


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_export_from_grpo_run_loads_in_transformers_with_the_source_weights(grpo_run, policy_dir, stage, tmp_path):
    transformers = pytest.importorskip("transformers")
    from model import Transformer
    from model.hf import from_hf_config, from_hf_pretrained

    run = grpo_run(stage)
    r = sputnik("export", "--from", str(run), "--to", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 1 of grpo run" in r.stdout  # step 2 has no marker: not a checkpoint
    source = torch.load(run / "source1.pt")
    init = from_hf_pretrained(policy_dir[0] / "hf").state_dict()
    weights = [k for k in source if not k.endswith(".load") and "freqs_cis" not in k]
    assert any(not torch.equal(source[k], init[k]) for k in weights)  # the learner step moved the weights
    exported = from_hf_pretrained(tmp_path / "hf").state_dict()
    for k in weights:
        assert torch.equal(exported[k], source[k]), k

    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    ref = Transformer(from_hf_config(json.loads((tmp_path / "hf" / "config.json").read_text())))
    ref.load_state_dict(source)
    tokens = torch.randint(0, ref.args.vocab, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = ref.eval()(tokens), hf(tokens).logits
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()


@pytest.mark.slow
def test_export_refuses_in_one_line(grpo_run, policy_dir, tmp_path):
    run = grpo_run(0)
    assert [(c.step, c.kind, c.tag) for c in find_checkpoints(run)] == [(1, "grpo", "step000001")]

    def refused(*args: str) -> str:
        r = sputnik("export", *args, "--to", str(tmp_path / "out"))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (r.returncode, r.stderr[-3000:])
        return r.stderr

    assert "no complete checkpoint at that step" in (err := refused("--from", str(run), "--step", "2")) and "(have: 1)" in err
    assert "not a run directory" in refused("--from", str(tmp_path))
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    cfg = load_config(moved / "config.yaml", ["grpo.init=/nonexistent/policy"])
    create_run_dir(cfg, moved)  # rewrites config.yaml
    assert "/nonexistent/policy" in refused("--from", str(moved))
    # an init whose config gives the embedding another shape: the export is read tensor by tensor,
    # and the mismatch refused in one line with nothing written
    other = tmp_path / "other-init"
    shutil.copytree(policy_dir[0] / "hf", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))
    create_run_dir(load_config(moved / "config.yaml", [f"grpo.init={other}"]), moved)
    err = refused("--from", str(moved))
    assert "does not match the model config" in err and "'embed.weight' has shape" in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def write_tied_checkpoint(rank: int, port: int, out: str, stage: int, world: int = 1) -> None:
    """One step of a model whose output head is its embedding (tie_embeddings), saved under ZeRO
    `stage` by `world` ranks (ZeRO stores the shared weight once); the module's whole state to source.pt."""
    import dataclasses

    from model import Transformer, load_model_args
    from orchestrator.config import PretrainConfig
    from orchestrator.dist_local import join_local_group
    from orchestrator.pretrain_worker import build_engine, train_step

    join_local_group(rank, world, port)
    import deepspeed

    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(load_model_args("tiny", vocab=97), tie_embeddings=True))
    engine, _ = build_engine(model, PretrainConfig(micro_batch_size=2, zero_stage=stage, steps=2, warmup_steps=1), world, bf16=False)

    class Rows:
        def __next__(self):
            t = torch.randint(0, 97, (2, 17))
            return {"tokens": t[:, :-1], "targets": t[:, 1:]}

    train_step(engine, model, Rows(), 1, torch.device("cpu"), 1)
    engine.save_checkpoint(out, tag="ds")
    with deepspeed.zero.GatheredParameters(list(model.parameters())):  # every rank takes part
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, Path(out) / "source.pt")


@pytest.mark.parametrize("stage", [2, 3])
def test_export_of_tied_embeddings_reads_the_weight_zero_stores_once(stage, tmp_path):
    """Export reads each tensor from the checkpoint's files (orchestrator/checkpoints.lazy_model_state):
    a head tied to the embedding, which ZeRO saves once, comes back as the trained embedding."""
    import dataclasses

    from model import load_model_args
    from model.hf import from_hf_pretrained
    from orchestrator.checkpoints import Checkpoint
    from orchestrator.export import export_checkpoint

    mp.spawn(write_tied_checkpoint, args=(free_port(), str(tmp_path), stage), nprocs=1, join=True)
    args = dataclasses.replace(load_model_args("tiny", vocab=97), tie_embeddings=True)
    export_checkpoint(Checkpoint(1, "pretrain", tmp_path, "ds"), args, tmp_path / "hf")
    source, exported = torch.load(tmp_path / "source.pt"), from_hf_pretrained(tmp_path / "hf").state_dict()
    for k in source:
        if not k.endswith(".load") and "freqs_cis" not in k:
            assert torch.equal(exported[k], source[k]), k
    assert torch.equal(exported["head.weight"], source["embed.weight"])


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_rows_read_from_a_checkpoint_are_the_rows_of_the_trained_tensor(stage, tmp_path):
    """Export asks for one expert of a layer's stacked experts at a time (model.hf.save_hf_state):
    lazy_model_state's read of some rows of a tensor is those rows of the trained module's tensor,
    from a checkpoint of 2 ranks; under ZeRO 3 a range of rows can straddle the ranks' pieces."""
    from orchestrator.checkpoints import Checkpoint, lazy_model_state

    mp.spawn(write_tied_checkpoint, args=(free_port(), str(tmp_path), stage, 2), nprocs=2, join=True)
    source = torch.load(tmp_path / "source.pt")
    state = lazy_model_state(Checkpoint(1, "pretrain", tmp_path, "ds"))
    stacked = [k for k in source if k.endswith(("experts.w1", "experts.w2", "experts.w3"))]
    assert stacked and all(source[k].dim() == 3 for k in stacked), stacked
    for k in stacked:
        n = source[k].shape[0]
        for rows in (slice(0, 1), slice(n // 2 - 1, n // 2 + 1), slice(n - 1, None), slice(1, n)):
            assert torch.equal(state[k](rows), source[k][rows]), (k, rows)
    for k in source:
        if not k.endswith(".load") and "freqs_cis" not in k:
            assert torch.equal(state[k](), source[k]), k
