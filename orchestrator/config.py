"""Run configuration: YAML files in configs/ parsed into typed dataclasses, with dotted overrides.

One dataclass per component (STYLE.md); the root `RunConfig` holds them. Each component receives
only its own section. `load_config(path, overrides)` reads the YAML, resolves the model preset,
applies `key.sub=value` overrides, and validates everything with pydantic before anything starts:
an unknown key, a wrong type or an out-of-range value raises `ConfigError`, whose message is one
line naming the file (or the override), the dotted key and what is allowed.

Test: `pytest tests/orchestrator/test_orch_config.py`."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import pydantic
import yaml
from pydantic import ConfigDict, Field

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)  # inf/NaN in a config only ever poisons a run
PositiveInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class ConfigError(ValueError):
    """A user-caused configuration problem; the message is one line naming the file and key."""


# Component configs owned by the orchestrator (ModelArgs, DataConfig and RewardConfig live in their own packages).

@dataclasses.dataclass
class TrackingConfig:
    """Where metrics go: always metrics.jsonl in the run directory, plus Weights & Biases."""

    __pydantic_config__ = _STRICT
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"  # offline unless asked
    project: str = "sputnik"  # W&B project
    entity: Optional[str] = None  # W&B entity (team or user; None: your default)
    tags: list[str] = dataclasses.field(default_factory=list)  # W&B run tags
    group: Optional[str] = None  # W&B group; None: the run's name, or the group of the run GRPO/eval starts from
    log_every: PositiveInt = 1  # steps between metric records and progress lines; the last step is always logged
    heatmap_every: PositiveInt = 50  # steps between expert-load heatmaps / rollout tables


@dataclasses.dataclass
class ClusterConfig:
    """How to reach Ray and what each role asks for. address None = start an embedded local Ray."""

    __pydantic_config__ = _STRICT
    address: Optional[str] = None  # "auto" inside `ray job submit`; None starts Ray locally
    num_cpus: Optional[PositiveInt] = None  # for the embedded Ray (None = all cores)
    host: str = "127.0.0.1"  # embedded Ray binds here
    storage_path: Optional[str] = None  # shared storage for multi-node checkpoints (NFS, s3://)
    # Each role instance is one placement-group bundle (orchestrator/placement.py); GPUs None = auto:
    # one per learner and per sampler on a cluster with GPUs, none otherwise.
    cpus_per_learner: PositiveFloat = 0.5
    gpus_per_learner: Optional[NonNegFloat] = None  # GPUs per learner and pretraining worker (None: 1 on a GPU cluster, else 0)
    cpus_per_sampler: PositiveFloat = 0.5  # CPUs per rollout sampler bundle
    gpus_per_sampler: Optional[NonNegFloat] = None  # GPUs per rollout sampler (None: 1 on a GPU cluster, else 0)
    cpus_per_evaluator: PositiveFloat = 0.25  # CPUs per reward evaluator bundle
    # a cluster that adds nodes on demand (`ray up` with max_workers above min_workers): roles that do
    # not fit now wait up to placement_timeout_s; on a fixed cluster they fail at once with the reason
    autoscaling: bool = False
    placement_timeout_s: PositiveFloat = 600.0  # how long a cluster that can grow may take to hold the roles


@dataclasses.dataclass
class PretrainConfig:
    """Ray Train + DeepSpeed pretraining (issue 7)."""

    __pydantic_config__ = _STRICT
    workers: PositiveInt = 2  # DeepSpeed data-parallel workers (one per GPU on a cluster)
    zero_stage: Literal[0, 1, 2, 3] = 2  # DeepSpeed ZeRO stage: 1 optimizer, 2 + gradients, 3 + weights sharded
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    fp8: bool = False  # FP8 block-scaled linears (Triton on GPU, emulated on CPU)
    offload_optimizer: bool = False  # keep optimizer state in CPU memory (ZeRO stages 1-3)
    micro_batch_size: PositiveInt = 8  # sequences per worker per micro-step
    grad_accum: PositiveInt = 1  # micro-batches per optimizer step
    steps: PositiveInt = 200  # length of the LR schedule
    stop_after: Optional[PositiveInt] = None  # end early at this step (resume later continues the schedule)
    lr: PositiveFloat = 3e-3  # peak learning rate (AdamW)
    min_lr_ratio: Fraction = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: NonNegInt = 20  # linear warmup from 0 to lr
    weight_decay: NonNegFloat = 0.1  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW (beta1, beta2)
    grad_clip: NonNegFloat = 1.0  # clip the global gradient norm to this (0: off)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass (less memory, more compute)
    compile: bool = False  # torch.compile (fullgraph) of the training forward and backward (issue 24); ZeRO 0-2, no EP, FP8 or checkpointing
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"  # aot_eager: the same graphs without code generation (tests)
    # ranks per expert-parallel group: each owns n_routed_experts / expert_parallel experts (their weights,
    # gradients, optimizer state) and computes them for the group's tokens (all-to-all); orchestrator/expert_shard.py
    expert_parallel: PositiveInt = 1
    expert_weights: Literal["owned", "replicated"] = "owned"  # owned: each rank holds only its experts; replicated: all, ZeRO-sharded like any weight (the old layout)
    checkpoint_every: PositiveInt = 50  # steps between checkpoints (and the last step)
    keep_checkpoints: PositiveInt = 2  # newest checkpoints kept on disk
    max_failures: NonNegInt = 0  # worker failures Ray Train recovers from by restarting at the last checkpoint


@dataclasses.dataclass
class SFTConfig(PretrainConfig):
    """Supervised fine-tuning (`sputnik sft`, issue 22): pretraining's keys, with fine-tuning's
    defaults, plus the model to start from and the table to learn."""

    __pydantic_config__ = _STRICT
    workers: PositiveInt = 1
    micro_batch_size: PositiveInt = 8
    steps: PositiveInt = 100
    lr: PositiveFloat = 1e-4
    min_lr_ratio: Fraction = 0.1
    warmup_steps: NonNegInt = 5
    weight_decay: NonNegFloat = 0.0
    init: Optional[str] = None  # a pretraining, GRPO or SFT run directory, or an HF directory
    tokenizer: Optional[str] = None  # tokenizer.json or an HF tokenizer directory; default: the init model's
    data: Optional[str] = None  # a .jsonl/.parquet table: prompt + completion columns (or chat messages), optional split
    seq_len: Optional[PositiveInt] = None  # positions per packed row (default: data.seq_len)
    eval_every: PositiveInt = 20  # steps between held-out loss/accuracy evaluations (and the last step)
    heldout_size: PositiveInt = 256  # held-out examples evaluated (the table's heldout split)


@dataclasses.dataclass
class SampleConfig:
    """Rejection sampling (`sputnik sample`, issue 22): a teacher's completions of train-split tasks,
    kept where the task's verifier accepts them, as an SFT table."""

    __pydantic_config__ = _STRICT
    teacher: Optional[str] = None  # a pretraining, GRPO or SFT run directory, or an HF directory
    tokenizer: Optional[str] = None  # tokenizer.json or an HF tokenizer directory; default: the teacher's
    tasks: str = "arithmetic"  # as grpo.tasks: arithmetic, code, humaneval, reasoning-gym:<generator>, or a task file
    prompts: PositiveInt = 512  # train-split prompts sampled
    samples: PositiveInt = 8  # completions per prompt (G)
    temperature: Optional[NonNegFloat] = None  # None: rollout.temperature
    keep: Literal["all", "shortest", "distinct"] = "distinct"  # accepted completions kept per prompt: every one, the shortest, or distinct texts
    max_per_prompt: PositiveInt = 4  # at most this many kept per prompt (keep=all|distinct)
    batch_prompts: PositiveInt = 64  # prompts per round (a progress line after each)
    sft_heldout_percent: Annotated[int, Field(ge=0, le=50)] = 5  # kept rows marked split=heldout (by task id), for SFT's held-out loss


@dataclasses.dataclass
class DistillConfig:
    """`sputnik distill` (issue 22): rejection-sample the teacher (the `sample:` section), then
    fine-tune the student on what it kept (the `sft:` section, with sft.init the student)."""

    __pydantic_config__ = _STRICT
    student: Optional[str] = None  # a run or HF directory; None: a fresh model of `student_preset`
    student_preset: Optional[str] = None  # a model preset (configs/models) initialised at random with the teacher's tokenizer


@dataclasses.dataclass
class RolloutConfig:
    """Sampling settings of the RolloutSampler actors."""

    __pydantic_config__ = _STRICT
    num_samplers: PositiveInt = 1  # RolloutSampler actors, each with a copy of the policy (or its share: expert_parallel)
    max_new_tokens: PositiveInt = 128  # generation budget per completion
    temperature: NonNegFloat = 1.0  # sampling temperature (0: greedy)
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0  # nucleus sampling: keep the smallest set of tokens with this much probability
    # batch-invariant decoding and log-probs (model/exact.py): sampler and learner log-probs agree bit for
    # bit on CPU fp32 with the same weights; ~2x slower decoding, ~5x slower learner passes (tiny, CPU); not with grpo.zero_stage=3
    exact: bool = False
    expert_parallel: PositiveInt = 1  # samplers per model copy, the routed experts split among them (all-to-all); divides num_samplers
    # fixed-shape decoding, each token one CUDA graph replay (model/static_decode.py); null: on CUDA samplers without exact/EP
    static_decode: Optional[bool] = None
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # weights and compute of the samplers; auto: the learners' (bf16 on GPUs, fp32 on CPU)


@dataclasses.dataclass
class GRPOConfig:
    """The GRPO loop (issue 8)."""

    __pydantic_config__ = _STRICT
    init: Optional[str] = None  # a `sputnik pretrain` run directory, or an HF directory (then set tokenizer)
    tokenizer: Optional[str] = None  # tokenizer.json; default: the one the init run was trained with
    tasks: str = "arithmetic"  # "arithmetic" (data.digits/families), "code" (synthetic programs) or a task table path
    train_size: PositiveInt = 4000  # train-split prompts drawn from the arithmetic generator
    steps: PositiveInt = 50  # GRPO updates (policy versions)
    prompts_per_step: PositiveInt = 16  # prompts per step; each gets group_size completions
    group_size: Annotated[int, Field(ge=2)] = 8  # completions per prompt (G): advantages are relative within the group
    learners: PositiveInt = 1  # PolicyLearner ranks (one DeepSpeed group)
    zero_stage: Literal[0, 1, 2, 3] = 0  # DeepSpeed ZeRO stage of the learners
    expert_parallel: PositiveInt = 1  # learners per expert-parallel group, each owning E/K routed experts; divides learners
    epochs: PositiveInt = 1  # passes over each step's samples
    minibatch_size: PositiveInt = 64  # completions per optimizer step
    lr: PositiveFloat = 1e-4  # learning rate (AdamW, constant)
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW
    weight_decay: NonNegFloat = 0.0  # AdamW decoupled weight decay
    grad_clip: NonNegFloat = 1.0  # clip the global gradient norm to this (0: off)
    advantage_scale: Literal["std", "none"] = "std"  # "none": Dr. GRPO's centred rewards
    # how per-token losses become one number: "token" = mean over the minibatch's tokens (DAPO),
    # "sequence" = mean per completion then over completions (GRPO), "constant" = sum divided by
    # completions x rollout.max_new_tokens (Dr. GRPO: no length normalisation)
    aggregation: Literal["token", "sequence", "constant"] = "token"
    clip_low: Fraction = 0.2  # PPO clip below: ratio >= 1 - clip_low
    clip_high: Fraction = 0.28  # PPO clip above: ratio <= 1 + clip_high (DAPO clip-higher)
    kl_beta: NonNegFloat = 0.0  # 0 skips the reference model entirely
    entropy_coef: NonNegFloat = 0.0  # entropy bonus per token (> 0 computes full logits in the update)
    reference: Literal["colocated", "actor"] = "colocated"  # where the frozen reference for the KL lives: a copy in each learner, or one actor of its own
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal and refill from the train split
    max_refill_rounds: NonNegInt = 2  # refills per step with dynamic sampling
    overlong: Literal["none", "filter", "penalty"] = "none"  # truncated completions: kept, left out of the loss (filter) or penalised (DAPO soft penalty)
    mode: Literal["sync", "async"] = "sync"  # async = one-step off-policy
    # ray: every role an actor; one_process: one learner, sampler and reward worker in the driver's process (a thread each in async), no Ray
    runtime: Literal["ray", "one_process"] = "ray"
    # async: samplers run up to max_lag policy versions ahead of the learners (1 = one step off policy)
    max_lag: PositiveInt = 1
    # correction for the gap between the sampler's (behaviour) and the learner's log-probs, ratio =
    # exp(learner - sampler) per token (issue 20): none; tis = weight each token's surrogate by
    # min(ratio, is_cap); mis = drop tokens whose ratio leaves [1/is_cap, is_cap] from the surrogate
    importance: Literal["none", "tis", "mis"] = "none"
    is_cap: Annotated[float, Field(gt=1)] = 2.0  # the cap of tis, the band of mis
    router_replay: bool = False  # the learner's MoE layers route rollout tokens to the sampler's experts (gate weights its own)
    activation_checkpointing: bool = False  # recompute each block's activations in the update's backward (less memory, ~1/3 more compute)
    compile: bool = False  # torch.compile (fullgraph) of the learner's forward passes (issue 24); not with ZeRO-3 or expert_parallel
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"  # aot_eager: the same graphs without code generation (tests)
    # how new weights reach the samplers: one object in the object store that each sampler fetches, or a broadcast
    # from learner rank 0 over a group of its own (NCCL/gloo); auto = collective when the learners have GPUs
    weight_sync: Literal["auto", "object_store", "collective"] = "auto"
    sync_timeout_s: PositiveFloat = 300.0  # a broadcast that takes longer falls back to the object store
    num_evaluators: PositiveInt = 1  # RewardWorker actors
    eval_every: PositiveInt = 10  # steps between held-out evaluations (and the last step)
    heldout_size: PositiveInt = 64  # held-out tasks evaluated
    # held-out evaluation: greedy accuracy, and pass@1 of this many samples per task at
    # rollout.temperature (0 = greedy only)
    heldout_samples: NonNegInt = 4
    checkpoint_every: PositiveInt = 25  # steps between checkpoints (and the last step)
    keep_checkpoints: PositiveInt = 2  # newest checkpoints kept on disk
    table_every: PositiveInt = 10  # a W&B Table of sample rollouts every K steps
    stop_after: Optional[PositiveInt] = None  # stop (with a checkpoint) after this step; for tests
    max_seconds: Optional[PositiveFloat] = None  # a time budget: the step that ends past it (from the first step) is the last, evaluated and saved


@dataclasses.dataclass
class DemoConfig:
    """`sputnik demo`: the second GRPO stage, on synthetic programming tasks scored in the sandbox,
    and the distillation stage. (Held-out sampling follows `grpo.heldout_samples`.)"""

    __pydantic_config__ = _STRICT
    code_steps: NonNegInt = 0  # 0 skips the programming stage (needs data.code_docs > 0)
    code_heldout_size: PositiveInt = 64  # held-out programming tasks evaluated
    # the distillation stage (issue 22; 0 skips it): a student preset pretrained as the teacher was,
    # fine-tuned on the GRPO policy's rejection-sampled completions, beside the same pretrained
    # student trained by GRPO directly for the same wall-clock time (DeepSeek-R1's comparison)
    distill_steps: NonNegInt = 0  # SFT steps of the student on the teacher's samples
    student_preset: str = "micro"  # the student's model preset (configs/models)
    distill_prompts: PositiveInt = 2048  # train-split prompts the teacher samples
    distill_samples: PositiveInt = 2  # completions per prompt; the distinct accepted ones are kept
    distill_lr: PositiveFloat = 3e-3  # the student's SFT peak learning rate
    distill_compare: bool = True  # also GRPO the pretrained student for the distillation's wall-clock time


@dataclasses.dataclass
class EvalConfig:
    """`sputnik eval`: score a checkpoint on a task table."""

    __pydantic_config__ = _STRICT
    checkpoint: Optional[str] = None  # a run directory, a checkpoint directory or an HF directory
    tasks: Optional[str] = None  # a task table (jsonl/parquet) or a generator name
    samples_per_task: NonNegInt = 0  # n in pass@k, sampled at rollout.temperature; 0 = greedy only (always measured)
    k: list[PositiveInt] = dataclasses.field(default_factory=lambda: [1])  # the k of each pass@k reported (each at most samples_per_task)
    limit: Optional[PositiveInt] = None  # score only the first N tasks


@dataclasses.dataclass
class RunConfig:
    """The root: everything one `sputnik` command needs."""

    __pydantic_config__ = _STRICT
    name: str = "run"  # run name: the default run directory is runs/<name>-<timestamp>/
    seed: NonNegInt = 0  # seeds data order, sampling and initialisation
    model: dict[str, Any] = dataclasses.field(default_factory=lambda: {"preset": "tiny"})
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    rewards: dict[str, Any] = dataclasses.field(default_factory=dict)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    demo: DemoConfig = dataclasses.field(default_factory=DemoConfig)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['grpo.group_size=8', 'name=x'] -> {'grpo.group_size': 8, 'name': 'x'} (values as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{what} {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def resolve_model_preset(model: Any, source: str) -> dict[str, Any]:
    """`model: tiny` or `model: {preset: tiny, dim: 256}` -> the preset's fields with overrides."""
    if isinstance(model, str):
        model = {"preset": model}
    if not isinstance(model, dict):
        raise ConfigError(f"{source}: key 'model' must be a preset name or a mapping")
    model = dict(model)
    preset = model.pop("preset", None)
    if preset is None:
        return model
    path = Path(preset) if str(preset).endswith((".yaml", ".yml")) else CONFIG_DIR / "models" / f"{preset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.yaml"))
        raise ConfigError(f"{source}: key 'model.preset' names unknown preset {preset!r} (known: {', '.join(known)})")
    return {**_read_yaml(path, "model preset"), **model}


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    node = raw
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{source}: key '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _field_names(tp: Any) -> list[str] | None:
    tp = _unwrap(tp)
    if dataclasses.is_dataclass(tp):
        return [f.name for f in dataclasses.fields(tp) if not f.name.startswith("_")]
    return None


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _unwrap(args[0])
    return tp


def _type_at(schema: Any, loc: tuple) -> Any:
    """The declared type at a pydantic error location (None when it cannot be followed)."""
    tp = schema
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(part, int) and typing.get_origin(tp) in (list, tuple):
            tp = typing.get_args(tp)[0]
            continue
        if not dataclasses.is_dataclass(tp) or not isinstance(part, str):
            return None
        hints = typing.get_type_hints(tp, include_extras=True)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def format_validation_error(err: pydantic.ValidationError, schema: Any, source_of) -> str:
    """The first problem of a pydantic error as one line: '<source>: key 'a.b' <problem>'."""
    e = err.errors()[0]
    full_loc = tuple(e["loc"])
    loc = tuple(str(p) for p in full_loc if isinstance(p, (str, int)))
    key = ".".join(loc) or "(root)"
    if e["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        allowed = _field_names(_type_at(schema, full_loc[:-1]))
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        problem = f"is not a known key{hint}"
    elif e["type"] in ("missing", "missing_argument"):
        problem = "is required but missing"
    elif e["type"] == "value_error" and isinstance(e.get("input"), dict):  # a cross-field check
        msg = e["msg"].removeprefix("Value error, ")
        return f"{source_of(key)}: key '{key}': {msg}"
    else:
        value = e.get("input")
        shown = repr(value) if not isinstance(value, (dict, list)) or len(repr(value)) < 60 else type(value).__name__
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        problem = f"has invalid value {shown}: {msg[0].lower() + msg[1:]}"
    return f"{source_of(key)}: key '{key}' {problem}"


def validate_section(schema: Any, data: dict[str, Any], source: str, prefix: str = "") -> Any:
    """Validate one component section (e.g. ModelArgs from `model:`) with a one-line error."""
    try:
        return pydantic.TypeAdapter(schema).validate_python(data)
    except pydantic.ValidationError as err:
        pre = f"{prefix}." if prefix else ""
        line = format_validation_error(err, schema, lambda key: source)
        raise ConfigError(line.replace("key '", f"key '{pre}", 1).replace(f"'{pre}(root)'", f"'{prefix}'")) from None


def load_config(path: str | Path | None, overrides: list[str] | dict[str, Any] = ()) -> RunConfig:
    """Read a run config YAML (or the defaults when path is None), apply overrides, validate."""
    source = str(path) if path is not None else "default config"
    raw = _read_yaml(Path(path), "config file") if path is not None else {}
    over = parse_overrides(list(overrides)) if not isinstance(overrides, dict) else dict(overrides)
    raw["model"] = resolve_model_preset(raw.get("model", {"preset": "tiny"}), source)
    model_over = {k: v for k, v in over.items() if k == "model.preset"}
    if model_over:  # a preset swap on the command line replaces the preset, keeping explicit keys
        raw["model"] = resolve_model_preset({"preset": model_over["model.preset"]}, "command line")
    for key, value in over.items():
        if key != "model.preset":
            _set_dotted(raw, key, value, f"command-line override '{key}={value}'")

    if "rewards" in raw:
        raw["rewards"] = _reward_shorthand(raw["rewards"])

    def source_of(key: str) -> str:
        for k in over:
            if key == k or key.startswith(k + ".") or k.startswith(key + "."):
                return f"command-line override '{k}={over[k]}'"
        return source

    try:
        cfg = pydantic.TypeAdapter(RunConfig).validate_python(raw)
    except pydantic.ValidationError as err:
        raise ConfigError(format_validation_error(err, RunConfig, source_of)) from None
    for section, schema in component_schemas().items():
        value = validate_section(schema, getattr(cfg, section), source_of(section), section)
        setattr(cfg, section, value)
    return cfg


def _reward_shorthand(section: Any) -> Any:
    """The `rewards:` section also as a list of rewards, or as {name: weight}: both become the full
    form {rewards: [{name, weight, options}], ...} (configs/rewards_example.yaml)."""
    if isinstance(section, list):
        return {"rewards": section}
    from rl.rewards import RewardConfig

    fields = {f.name for f in dataclasses.fields(RewardConfig)}
    if isinstance(section, dict) and section and not set(section) & fields and all(isinstance(v, (int, float)) for v in section.values()):
        return {"rewards": [{"name": k, "weight": v} for k, v in section.items()]}
    return section


def component_schemas() -> dict[str, Any]:
    """Sections whose dataclasses live in other packages (imported lazily: they pull in torch)."""
    from data import DataConfig
    from model import ModelArgs

    schemas: dict[str, Any] = {"model": ModelArgs, "data": DataConfig}
    try:  # the reward package (issue 6) may not have landed yet
        from rl.rewards import RewardConfig
    except ImportError:
        return schemas
    schemas["rewards"] = RewardConfig
    return schemas


def to_dict(cfg: Any) -> Any:
    """Plain Python data (dicts, lists, scalars) for YAML/JSON/W&B."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config; `load_config(path)` reads it back to an equal RunConfig."""
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
