"""Checkpoint layouts of pretraining and GRPO runs: when a checkpoint is complete, which ones a run
has, the full fp32 model state in one, and the model config it was trained with.

Pretraining (orchestrator/pretrain_worker.py; Ray Train merges the workers' parts into one
`checkpoint_*` folder under RUN/checkpoints/train/):
    <ckpt>/ds/             DeepSpeed `engine.save_checkpoint(<ckpt>, tag="ds")` of every rank
    <ckpt>/rank{r}.pt      rank r's loader position and RNG state
    <ckpt>/meta.json       {"step", "world_size", "tag", "expert_parallel", "zero_stage",
                           "micro_batch_size", "grad_accum"}, written last by rank 0
GRPO (orchestrator/grpo/checkpoint.py):
    RUN/checkpoints/learners/<tag>/   DeepSpeed `engine.save_checkpoint(RUN/checkpoints/learners, tag)`
    RUN/checkpoints/<tag>.json        {"step", "version", "data_position", "tag"}, written last
A checkpoint counts only when its marker (meta.json, <tag>.json), DeepSpeed's model states and, for
pretraining, every rank's part are there: a save cut short by a crash is ignored. Both engines wrap
the Transformer as `.model`, so their state-dict keys are "model." + the Transformer's.

Test: `pytest tests/orchestrator/test_orch_checkpoints.py tests/orchestrator/test_orch_pretrain.py`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import torch

from model import ModelArgs
from orchestrator.config import ConfigError, load_config

DS_TAG = "ds"  # pretraining's DeepSpeed tag: one checkpoint per Ray Train checkpoint folder
META = "meta.json"
MODEL_PREFIX = "model."  # the engines' wrapper modules hold the Transformer as `.model`


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint: DeepSpeed's `save_checkpoint(ds_dir, tag=tag)` taken after `step`."""

    step: int
    kind: Literal["pretrain", "grpo"]
    ds_dir: Path
    tag: str

    @property
    def path(self) -> Path:
        return self.ds_dir / self.tag


# ---------------------------------------------------------------------------------------------
# Pretraining parts: every rank writes its own into a directory that Ray Train then merges
# ---------------------------------------------------------------------------------------------


def rank_file(path: Path, rank: int) -> Path:
    return Path(path) / f"rank{rank}.pt"


def save_pretrain_part(engine, path: Path, *, step: int, rank: int, world: int, worker_state: dict, experts=None) -> None:
    """This rank's part of a pretraining checkpoint in `path` (call on every rank); `experts`: the
    rank's ExpertShard (owned experts), its piece saved in `path/experts/`."""
    engine.save_checkpoint(str(path), tag=DS_TAG)
    if experts is not None:
        experts.save(path)
    torch.save(worker_state, rank_file(path, rank))
    if rank == 0:  # written last: its presence marks rank 0's part complete
        (Path(path) / META).write_text(json.dumps({
            "step": step, "world_size": world, "tag": DS_TAG, "expert_parallel": experts.ep if experts is not None else 1,
            "zero_stage": engine.zero_optimization_stage(), "micro_batch_size": engine.train_micro_batch_size_per_gpu(),
            "grad_accum": engine.gradient_accumulation_steps()}))


def load_pretrain_part(engine, path: Path, *, rank: int, world: int, experts=None, job: str = "pretrain") -> tuple[int, dict]:
    """Restore `engine` (and `experts`) from a pretraining checkpoint saved at any world size, EP
    degree and ZeRO stage (orchestrator/reshard.py when DeepSpeed cannot load it itself); returns
    (step, this rank's worker state: the saved rank's, or rank 0's where the world grew)."""
    from orchestrator.expert_shard import expert_layout
    from orchestrator.reshard import load_resharded, needs_reshard

    meta = json.loads((Path(path) / META).read_text())
    if needs_reshard(meta, engine, world, experts, owned=expert_layout(path) is not None):
        load_resharded(engine, path, meta, world=world, experts=experts, job=job)
    else:
        engine.load_checkpoint(str(path), tag=meta["tag"])
        if experts is not None:
            experts.load(path)
    saved_rank = rank if rank < meta["world_size"] else 0  # the loader's position is the same on every rank
    return meta["step"], torch.load(rank_file(path, saved_rank), weights_only=False)


# ---------------------------------------------------------------------------------------------
# Finding complete checkpoints
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _has_model_states(tag_dir: Path) -> bool:
    return tag_dir.is_dir() and any(tag_dir.glob("*model_states.pt"))


def _pretrain_checkpoint(folder: Path) -> Checkpoint | None:
    meta = _read_json(folder / META)
    if meta is None:
        return None
    tag = meta.get("tag", DS_TAG)
    ranks_ok = all(rank_file(folder, r).is_file() for r in range(meta.get("world_size", 1)))
    ep = meta.get("expert_parallel", 1)
    if ep > 1:
        from orchestrator.expert_shard import experts_complete

        ranks_ok = ranks_ok and experts_complete(folder)
    return Checkpoint(meta["step"], "pretrain", folder, tag) if ranks_ok and _has_model_states(folder / tag) else None


def grpo_learners_dir(run_dir: Path) -> Path:
    """Where GRPO learners save: `engine.save_checkpoint(grpo_learners_dir(run), tag)`."""
    return Path(run_dir) / "checkpoints" / "learners"


def grpo_marker(run_dir: Path, tag: str) -> Path:
    """The JSON marker of GRPO checkpoint `tag`, written last: its presence completes the checkpoint."""
    return Path(run_dir) / "checkpoints" / f"{tag}.json"


def grpo_state(ckpt: Checkpoint) -> dict:
    """The driver state saved with a GRPO checkpoint (step, version, data_position, tag)."""
    return json.loads(grpo_marker(ckpt.ds_dir.parent.parent, ckpt.tag).read_text())


def _grpo_checkpoint(marker: Path) -> Checkpoint | None:
    state = _read_json(marker)
    if state is None:
        return None
    ds_dir, tag = marker.parent / "learners", state.get("tag") or marker.stem
    from orchestrator.expert_shard import expert_layout, experts_complete

    experts_ok = expert_layout(ds_dir / tag) is None or experts_complete(ds_dir / tag)  # owned experts: every piece present
    return Checkpoint(state["step"], "grpo", ds_dir, tag) if experts_ok and _has_model_states(ds_dir / tag) else None


def find_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """The complete checkpoints of a pretraining or GRPO run directory, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [_pretrain_checkpoint(m.parent) for m in root.glob(f"**/{META}")]
    found += [_grpo_checkpoint(m) for m in root.glob("step*.json")]
    return sorted((c for c in found if c is not None), key=lambda c: c.step)


# ---------------------------------------------------------------------------------------------
# What a checkpoint holds
# ---------------------------------------------------------------------------------------------


def lazy_model_state(ckpt: Checkpoint) -> dict:
    """{name: a function returning that tensor of the Transformer's state dict (fp32 master weights,
    buffers), or only its rows `rows` when given one (a slice of the first dimension: some experts
    of a layer's stacked experts)}, read from `ckpt`'s memory-mapped files when called: the owned
    experts from their pieces, ZeRO 1-3 weights from every rank's partitions
    (orchestrator/reshard.py), ZeRO 0's module as saved. One tensor, or one expert, is in memory at
    a time, not the model."""
    if any(ckpt.path.glob("*optim_states.pt")):  # ZeRO 1-3: the fp32 weights are partitioned over the ranks
        from orchestrator.reshard import read_full_state

        full, module, states = read_full_state(ckpt.path)
        state = {k: _partitioned_weight(f) for k, f in full.items()}
        state.update({alias: state[source] for alias, source in states["shared_params"].items() if source in state})  # tied weights
    else:  # ZeRO 0: the module is saved whole, optimizer included
        module = torch.load(ckpt.path / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True, weights_only=False)["module"]
        state = {}
    state.update({k: _saved_tensor(v) for k, v in module.items()})
    state = {k.removeprefix(MODEL_PREFIX): _as_float(f) for k, f in state.items()}
    from orchestrator.expert_shard import ExpertCheckpoint, expert_layout

    folder = ckpt.path if ckpt.kind == "grpo" else ckpt.ds_dir  # a GRPO checkpoint's experts are in its tag folder
    if expert_layout(folder) is not None:  # owned experts: every slice, reassembled
        saved = ExpertCheckpoint(folder)
        state.update({k: _as_float(_owned_experts(saved, k)) for k in saved.n_experts})
    return state


def _partitioned_weight(full):
    return lambda rows=None: full(("weight",), rows)["weight"]


def _saved_tensor(t: torch.Tensor):
    return lambda rows=None: t if rows is None else t[rows]


def _owned_experts(saved, key: str):
    return lambda rows=None: saved.read(key, None if rows is None else (lambda n: rows), names=("weight",))["weight"]


def _as_float(read):
    def tensor(rows=None) -> torch.Tensor:
        t = read(rows)
        return t.float() if t.is_floating_point() else t
    return tensor


def load_model_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The Transformer's full state dict (fp32 master weights, buffers) gathered from all ranks."""
    return {k: read() for k, read in lazy_model_state(ckpt).items()}


def _hf_config(source: Path) -> Path | None:
    """config.json of the HF model a model source stands for: an HF directory, or a run whose
    summary.json names its export (pretraining and GRPO runs export to `hf/`)."""
    if (source / "config.json").is_file():
        return source / "config.json"
    summary = _read_json(source / "summary.json") or {}
    hf = Path(summary.get("hf_export", source / "hf"))
    return hf / "config.json" if (hf / "config.json").is_file() else None


def find_tokenizer(source: Path) -> Path | None:
    """The tokenizer.json of a model source, without extra keys: inside an HF directory (beside its
    tokenizer_config.json), or for a run directory its `hf/` export's, the one its summary.json
    names, the one its GRPO config used (`grpo.tokenizer`, else its `grpo.init`'s), or for a
    pretraining run the one its corpus cache holds. None when there is none."""
    source = Path(source)
    if (source / "config.json").is_file():
        return source / "tokenizer.json" if (source / "tokenizer.json").is_file() else None
    summary = _read_json(source / "summary.json") or {}
    hf = Path(summary.get("hf_export", source / "hf"))
    candidates = [hf / "tokenizer.json", Path(summary["tokenizer"]) if summary.get("tokenizer") else None]
    if (source / "config.yaml").is_file():
        cfg = load_config(source / "config.yaml")
        if cfg.grpo.tokenizer:
            t = Path(cfg.grpo.tokenizer)
            candidates.append(t / "tokenizer.json" if t.is_dir() else t)
        if cfg.grpo.init and Path(cfg.grpo.init).resolve() != source.resolve():
            candidates.append(find_tokenizer(Path(cfg.grpo.init)))
        if not grpo_learners_dir(source).exists():  # a pretraining run: the tokenizer of its corpus (data/prepare.py)
            from data.prepare import corpus_fingerprint
            from orchestrator.pretrain import cache_root

            candidates.append(cache_root() / f"data-{corpus_fingerprint(cfg.data)}" / "tokenizer.json")
    return next((c for c in candidates if c is not None and c.is_file()), None)


def model_args(run_dir: Path, ckpt: Checkpoint) -> ModelArgs:
    """The ModelArgs `ckpt`'s weights have. A GRPO policy has the shape of its `grpo.init` model,
    whatever the `model:` section of the GRPO config says; the run's own export is the fallback
    when the init model has moved."""
    from model.hf import from_hf_config

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if ckpt.kind == "pretrain":
        return cfg.model
    sources = [Path(cfg.grpo.init)] if cfg.grpo.init else []
    for config_json in (_hf_config(s) for s in [*sources, run_dir]):
        if config_json is not None:
            return from_hf_config(json.loads(config_json.read_text()))
    raise ConfigError(f"--from {run_dir}: the GRPO run's init model ({cfg.grpo.init}) has no config.json "
                      f"(an HF directory, or a run with an `hf/` export), so its model shape is unknown; "
                      f"run export from the directory the GRPO run was started in")


def resolve_model_source(init: str | None, tokenizer: str | None, section: str) -> tuple[Path, Path]:
    """(HF model directory, tokenizer.json) from `<section>.init`: a pretraining, GRPO or SFT run
    directory (its `hf/` export), or a Hugging Face directory. The tokenizer is `<section>.tokenizer`
    when set, else the one the model source holds (find_tokenizer): ours or any Hugging Face
    tokenizer (tokenizer.json + tokenizer_config.json). A missing one is a ConfigError naming the key."""
    if not init:
        raise ConfigError(f"key '{section}.init' is required: a `sputnik pretrain`, `sputnik grpo` or `sputnik sft` run directory, "
                          f"or a Hugging Face directory")
    src = Path(init)
    if not src.is_dir():
        raise ConfigError(f"key '{section}.init': {src} is not a directory")
    summary = src / "summary.json"
    if (src / "config.json").is_file():
        hf = src
    elif summary.is_file():
        hf = Path(json.loads(summary.read_text()).get("hf_export", src / "hf"))
    else:
        raise ConfigError(f"key '{section}.init': {src} holds neither an HF model (config.json) nor a run (summary.json)")
    if not (hf / "config.json").is_file():
        raise ConfigError(f"key '{section}.init': no HF model in {hf} (was the run finished and exported?)")
    if tokenizer:
        tok = Path(tokenizer)
        tok = tok / "tokenizer.json" if tok.is_dir() else tok
        if not tok.is_file():
            raise ConfigError(f"key '{section}.tokenizer': {tok} does not exist")
        return hf, tok
    tok = find_tokenizer(src)
    if tok is None:
        raise ConfigError(f"key '{section}.tokenizer': no tokenizer.json in {hf} or the run {src}; set {section}.tokenizer "
                          f"to a tokenizer.json or a Hugging Face tokenizer directory")
    return hf, tok
