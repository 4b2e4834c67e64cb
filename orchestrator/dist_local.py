"""torch.distributed on one machine: a free loopback port and a gloo group joined as DeepSpeed
expects (MASTER_ADDR/PORT, RANK, WORLD_SIZE and LOCAL_RANK in the environment, the CPU accelerator).
For the processes that tests and benchmarks spawn to run real DeepSpeed ranks side by side; the
runs themselves get their groups from Ray Train or the learners' own rendezvous (a one-process GRPO
run, orchestrator/one_process.py, takes its learner's port from `free_port`).

Test: the spawned ranks of `pytest tests/orchestrator/test_orch_expert_shard.py` use it.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def join_local_group(rank: int, world: int, port: int, *, threads: int = 1) -> None:
    """Make this process rank `rank` of a `world`-rank gloo group hosted on 127.0.0.1:`port`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
