"""Starting or joining Ray: embedded on 127.0.0.1 for laptops and tests, `address` for clusters.

Test: used by every `ray`-marked test.
"""

from __future__ import annotations

import json
import logging
import os

from orchestrator.config import ClusterConfig

# Ray Train's PlacementGroupCleaner asks the State API every second whether the train controller
# is alive. The embedded Ray runs without the dashboard that serves that API, so each check fails
# with a warning ("Failed to query Ray Train Controller actor state", hundreds in a demo). Its job,
# freeing the placement groups of a crashed controller, ends with the embedded Ray anyway, so the
# embedded Ray's workers keep that logger to errors.
_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
# Where a `ray job`'s entrypoint finds the job's config, runtime_env included (ray._private.runtime_env.constants).
_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"
_POLL_INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def quiet_embedded_worker() -> None:
    """worker_process_setup_hook of the embedded Ray (see _CLEANER_LOGGER)."""
    logging.getLogger(_CLEANER_LOGGER).setLevel(logging.ERROR)


def init_ray(cfg: ClusterConfig, *, runtime_env: dict | None = None):
    """Connect to the cluster at cfg.address, or start a local Ray bound to cfg.host."""
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Train V2 (the TorchTrainer we use) is opt-in on some Ray versions.
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    env = {"env_vars": {k: os.environ[k] for k in ("DS_ACCELERATOR", "WANDB_MODE", "SPUTNIK_KERNELS", "TRITON_INTERPRET", "PYTHONPATH") if k in os.environ}}
    env["env_vars"]["RAY_TRAIN_V2_ENABLED"] = "1"
    # Ray Train's print patch both logs a worker's print and tees it to a wrapped stdout, so each
    # progress line would reach the driver twice; without it, log_to_driver forwards it once.
    env["env_vars"].setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0"))
    # Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
    # default), and a worker's result queue holds one report: each checkpoint report after the first
    # stalls the training loop until the next poll, and the run's end is seen only at the next poll
    # (about 8 s of a 16-step run with 4 checkpoints). A poll is one small actor call per worker.
    env["env_vars"].setdefault(_POLL_INTERVAL, os.environ.get(_POLL_INTERVAL, "0.25"))
    if runtime_env:
        env.update(runtime_env)
    # Under `ray job submit` RAY_ADDRESS names the job's cluster: use it unless the config names one
    # (starting a second, local Ray inside a job fails on the job's runtime_env).
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        # A job's own runtime_env (`ray job submit --runtime-env-json`) is merged with this one, and
        # Ray refuses a variable set in both: the job's value is already in our environment.
        job_env = (json.loads(os.environ.get(_JOB_CONFIG, "{}")).get("runtime_env") or {}).get("env_vars") or {}
        env["env_vars"] = {k: v for k, v in env["env_vars"].items() if k not in job_env}
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        env["worker_process_setup_hook"] = "orchestrator.ray_local.quiet_embedded_worker"
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            include_dashboard=False,
            _node_ip_address=cfg.host,
            runtime_env=env,
            log_to_driver=True,
        )
    from orchestrator.signals import stop_on_sigterm

    stop_on_sigterm()  # after ray.init, which replaced it with a handler that aborts
    return ray


def reenter_working_dir() -> None:
    """Enter the working directory again if it was deleted under us. Under `ray job submit
    --working-dir`, each process of the job that Ray starts with the same package deletes the
    unpacked directory and unpacks it afresh at the same path (ray PR 49313), so the driver's
    working directory vanishes once its first actors start: os.getcwd() then fails (wandb.init
    calls it). The shell that ran the entrypoint left the path in $PWD."""
    try:
        os.getcwd()
    except FileNotFoundError:
        pwd = os.environ.get("PWD")
        if pwd and os.path.isdir(pwd):
            os.chdir(pwd)
