"""DeepSpeed engine setup shared by the pretraining workers and the GRPO policy learners.

`import_deepspeed()` imports DeepSpeed ready for a CPU or GPU worker; `deepspeed_config(...)` turns
our dataclass settings into DeepSpeed's JSON config; `lr_lambda(...)` is the warmup + cosine
schedule (wrapped in a torch LambdaLR, so DeepSpeed saves its state in every checkpoint).

Test: `pytest tests/orchestrator/test_orch_pretrain.py tests/orchestrator/test_orch_grpo.py`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch


def import_deepspeed():
    """Import DeepSpeed for a CPU or GPU worker.

    On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce
    (`deepspeed_shm_comm`) into ~/.cache/torch_extensions under a file lock. A compile killed
    half-way (a timed-out job, a killed worker) leaves that lock behind and every later run on
    the machine waits on it forever, silently. We run gloo on CPU anyway, so the op is switched
    off before DeepSpeed's backend is created.

    DeepSpeed's ZeRO all-gathers call `torch.distributed.all_gather_into_tensor`, which this torch
    deprecates with a FutureWarning every few steps in every worker; nothing our users can act
    on, so that one warning is filtered.
    """
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated", category=FutureWarning)
    import deepspeed
    import deepspeed.ops

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def deepspeed_config(
    *,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    zero_stage: int,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    grad_clip: float,
    bf16: bool,
    offload_optimizer: bool = False,
    n_params: int | None = None,
) -> dict[str, Any]:
    """`n_params`: the parameters DeepSpeed will hold; its communication buckets are capped at that
    (DeepSpeed's defaults, 5e8 elements for reduction, allocate a 2 GB fp32 buffer per ZeRO-3 rank
    whatever the model's size: a 7.6M-parameter model's ZeRO-3 rank held 1.95 GB of tensors, 69 MB
    with the cap; benchmarks/expert_memory.py --stage 3)."""
    on_gpu = torch.cuda.is_available()
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage > 0:
        # Round-robin-free contiguous buckets keep results independent of the world size.
        zero.update({"contiguous_gradients": True, "overlap_comm": False, "reduce_scatter": True})
        if n_params is not None:
            cap = max(int(n_params), 1)
            zero.update({"reduce_bucket_size": min(int(5e8), cap), "allgather_bucket_size": min(int(5e8), cap)})
            if zero_stage == 3:
                zero.update({"stage3_prefetch_bucket_size": min(int(5e7), cap),
                             "stage3_param_persistence_threshold": min(int(1e5), cap)})
    if offload_optimizer and zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip if grad_clip > 0 else 0.0,
        "optimizer": {
            "type": "AdamW",
            "params": adamw_params(lr, betas, weight_decay, torch_adam=not on_gpu or not offload_optimizer),
        },
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def adamw_params(lr: float, betas, weight_decay: float, *, torch_adam: bool) -> dict[str, Any]:
    """DeepSpeed's AdamW parameters. torch_adam: torch's AdamW instead of DeepSpeed's compiled op (no
    build step on CPU), fused: one pass over each tensor, on CPU and CUDA, with no temporaries (the
    unfused update makes fp32 temporaries the size of the whole flat partition that ZeRO hands it,
    and is 12-13x slower on CPU: benchmarks/optimizer_step.py, BENCHMARKS.md "Optimizer"). The
    offloaded optimizer is DeepSpeed's CPU Adam, fused already."""
    params: dict[str, Any] = {"lr": lr, "betas": list(betas), "eps": 1e-8, "weight_decay": weight_decay, "torch_adam": torch_adam}
    if torch_adam:
        params["fused"] = True
    return params


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup from lr/warmup to lr, then cosine decay to lr * min_lr_ratio at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
