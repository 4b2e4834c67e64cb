"""What a GRPO run reads before any actor starts: the init model and its tokenizer, the task
split, the reward config, and the checks a user's config must pass.

Errors a user can cause are `ConfigError`s naming the key (exit status 2 from the CLI).

Test: `pytest tests/orchestrator/test_orch_grpo.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from orchestrator.config import ConfigError, RunConfig


def resolve_init(cfg: RunConfig) -> tuple[Path, Path]:
    """(HF model directory, tokenizer.json) of `grpo.init` and `grpo.tokenizer`
    (orchestrator/checkpoints.py: resolve_model_source)."""
    from orchestrator.checkpoints import resolve_model_source

    return resolve_model_source(cfg.grpo.init, cfg.grpo.tokenizer, "grpo")


def task_set_rows(spec: str, *, seed: int, key: str) -> list[dict]:
    """The rows of a named task set or task file (data.tasks.task_set: humaneval,
    reasoning-gym:<generator>?size=N&seed=S, .jsonl/.parquet); a bad name or row is a ConfigError."""
    from data.tasks import REASONING_GYM, task_set

    if spec not in ("humaneval",) and not spec.startswith(REASONING_GYM) and not Path(spec).is_file():
        raise ConfigError(f"key '{key}': {spec!r} is neither a generator (arithmetic, code), a task set (humaneval, "
                          f"reasoning-gym:<generator>) nor a task file")
    try:
        return task_set(spec, seed=seed).to_pylist()
    except (ValueError, OSError) as e:  # a malformed table or generator: the message names the row or option
        raise ConfigError(f"key '{key}': {e}") from None


def load_tasks(cfg: RunConfig, key: str = "grpo.tasks") -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) as lists of dicts: the generators' own splits, or a task set's
    rows split by prompt hash (held-out capped at grpo.heldout_size)."""
    g, d = cfg.grpo, cfg.data
    if g.tasks == "arithmetic":
        from data.tasks import generate_arithmetic

        kw = dict(families=tuple(d.task_families or d.families), digits=d.digits, heldout_percent=d.heldout_percent)
        train = generate_arithmetic(g.train_size, seed=cfg.seed, split="train", **kw)
        heldout = generate_arithmetic(g.heldout_size, seed=cfg.seed + 1, split="heldout", **kw)
        return train.to_pylist(), heldout.to_pylist()
    if g.tasks == "code":
        from data.tasks import generate_code_tasks

        kw = dict(digits=d.digits, heldout_percent=d.heldout_percent)
        train = generate_code_tasks(g.train_size, seed=cfg.seed, split="train", **kw)
        heldout = generate_code_tasks(g.heldout_size, seed=cfg.seed + 1, split="heldout", **kw)
        return train.to_pylist(), heldout.to_pylist()
    rows = task_set_rows(g.tasks, seed=cfg.seed, key=key)
    train = [r for r in rows if r["split"] == "train"]
    heldout = [r for r in rows if r["split"] != "train"][: g.heldout_size]
    if not train:
        raise ConfigError(f"key '{key}': {g.tasks} has no train-split tasks")
    names = [s.name for s in reward_config(cfg).rewards]
    if any(r["kind"] == "code" for r in train) and "code_tests" not in names and not any(n.rpartition(":")[0].endswith(".py") for n in names):
        # the weighted reward would never look at whether a program works
        raise ConfigError(f"key 'rewards.rewards': {g.tasks} holds code tasks but the rewards ({', '.join(names)}) do not run "
                          f"programs; add {{name: code_tests}} (configs/rewards_example.yaml)")
    return train, heldout


def reward_config(cfg: RunConfig):
    """The `rewards:` section, plus the DAPO overlong penalty when grpo.overlong=penalty."""
    import copy

    from pydantic import TypeAdapter

    from rl.rewards import RewardConfig, RewardSpec

    rc = TypeAdapter(RewardConfig).validate_python(cfg.rewards) if isinstance(cfg.rewards, dict) else copy.deepcopy(cfg.rewards)
    for i, spec in enumerate(rc.rewards):
        problem = reward_problem(spec.name)
        if problem:
            raise ConfigError(f"key 'rewards.rewards.{i}.name': {problem}")
    if cfg.grpo.overlong == "penalty" and not any(s.name == "overlong" for s in rc.rewards):
        n = cfg.rollout.max_new_tokens
        rc.rewards.append(RewardSpec("overlong", 1.0, {"max_len": n, "cache_len": max(1, n // 4)}))
    return rc


def reward_problem(name: str) -> str | None:
    """Why a reward name cannot be used (None if it can): unknown built-in, missing file or function.
    Checked at config time, so that a typo is one error now instead of an error per sample later."""
    import ast

    from rl.rewards.registry import registered

    path, sep, func = name.rpartition(":")
    if not (sep and path.endswith(".py")):
        return None if name in registered() else f"unknown reward {name!r} (built-in: {', '.join(registered())}; or path/to/file.py:function)"
    if not Path(path).is_file():
        return f"reward file {path} does not exist"
    try:
        tree = ast.parse(Path(path).read_bytes(), filename=path)
    except (SyntaxError, ValueError) as e:
        return f"reward file {path} does not parse: {e}"
    if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == func for n in tree.body):
        return f"reward file {path} defines no function {func!r}"
    return None


def validate(cfg: RunConfig) -> None:
    """Checks across sections, before any actor starts."""
    g = cfg.grpo
    if g.learners > 1 and g.minibatch_size < g.learners:
        raise ConfigError(f"key 'grpo.minibatch_size' ({g.minibatch_size}) must be at least grpo.learners ({g.learners})")
    check_expert_parallel(cfg)
    if g.runtime == "one_process":
        from orchestrator.one_process import check_one_process

        check_one_process(cfg)
    if g.compile and (g.zero_stage == 3 or g.expert_parallel > 1 or cfg.rollout.exact or g.activation_checkpointing):
        raise ConfigError("key 'grpo.compile' compiles the learner's whole forward as one graph: not with grpo.zero_stage=3 "
                          "(parameters gathered by hooks), grpo.expert_parallel > 1 (all-to-all with host-side counts), rollout.exact "
                          "or grpo.activation_checkpointing")
    if cfg.cluster.address is None and cfg.cluster.num_cpus is not None and g.runtime == "ray":  # the embedded Ray: one node of num_cpus
        from orchestrator.placement import Node, PlanError, make_plan, roles_for

        try:
            make_plan(roles_for(cfg, "grpo", 0), [Node(float(cfg.cluster.num_cpus))])
        except PlanError as e:
            raise ConfigError(f"key 'cluster.num_cpus' ({cfg.cluster.num_cpus}) is too small: {e}") from None


def check_expert_parallel(cfg: RunConfig) -> None:
    """`grpo.expert_parallel` and `rollout.expert_parallel` K: groups of K learners or samplers, each
    member one K-th of the routed experts."""
    g = cfg.grpo
    if g.expert_parallel > 1:
        if g.learners % g.expert_parallel:
            raise ConfigError(f"key 'grpo.expert_parallel' ({g.expert_parallel}) must divide grpo.learners ({g.learners})")
        if cfg.rollout.exact:
            raise ConfigError("key 'rollout.exact' needs whole experts on every learner: set grpo.expert_parallel to 1")
        _check_divides(cfg, "grpo.expert_parallel", g.expert_parallel)
    r, K = cfg.rollout, cfg.rollout.expert_parallel
    if r.static_decode and (r.exact or K > 1):
        raise ConfigError(f"key 'rollout.static_decode' decodes with fixed shapes, without {'rollout.exact' if r.exact else 'expert-parallel samplers'}"
                          f": leave it unset (or false), or set {'rollout.exact to false' if r.exact else 'rollout.expert_parallel to 1'}")
    if K == 1:
        return
    if r.num_samplers % K:
        raise ConfigError(f"key 'rollout.expert_parallel' ({K}) must divide rollout.num_samplers ({r.num_samplers})")
    if r.exact:
        raise ConfigError("key 'rollout.exact' decodes with the whole model in one process: set rollout.expert_parallel to 1")
    if cfg.grpo.weight_sync == "collective":
        raise ConfigError("key 'grpo.weight_sync' collective broadcasts the whole policy to every sampler; expert-parallel "
                          "samplers take their shards from the object store: set it to auto or object_store")
    _check_divides(cfg, "rollout.expert_parallel", K)


def _check_divides(cfg: RunConfig, key: str, k: int) -> None:
    from model.hf import hf_model_args

    hf_dir, _ = resolve_init(cfg)
    experts = hf_model_args(hf_dir).n_routed_experts
    if experts % k:
        raise ConfigError(f"key '{key}' ({k}) must divide the model's routed experts (n_routed_experts {experts} in {hf_dir / 'config.json'})")


class TaskStream:
    """Train prompts in a seeded order, reshuffled every epoch; `position` is the data position."""

    def __init__(self, rows: list[dict], seed: int, position: int = 0):
        self.rows, self.seed, self.position = rows, seed, position

    def take(self, n: int) -> list[dict]:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, len(self.rows))
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            out.append(self.rows[int(order[i])])
            self.position += 1
        return out
