"""Collective weight sync (orchestrator/grpo/weight_sync.py): a broadcast from learner rank 0 to the
samplers over a process group of its own (gloo here; NCCL on GPUs runs the same code).

- pack/unpack keep every tensor bit for bit across dtypes (against the state itself);
- three real processes: the receivers hold exactly the sender's state (sha256 of every tensor);
- the GRPO driver with it: tests/orchestrator/test_orch_grpo.py
  (test_collective_weight_sync_and_recovery_from_a_dead_sampler).
"""

import multiprocessing as mp
import socket

import pytest
import torch

from orchestrator.grpo.rollout import state_hash
from orchestrator.grpo.weight_sync import SyncGroup, empty_buffers, pack, unpack, weights_meta


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(7, 5, generator=g),
        "layers.0.norm.weight": torch.randn(5, generator=g).to(torch.bfloat16),
        "layers.0.gate.bias": torch.randn(3, generator=g),
        "steps": torch.tensor([3, 1, 4], dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }


def test_pack_unpack_is_bit_identical_across_dtypes():
    state = _state(0)
    meta = weights_meta(state)
    bufs = pack(state, meta, torch.device("cpu"))
    assert [b.dtype for b in bufs] == [torch.float32, torch.bfloat16, torch.int64]
    assert [b.shape for b in bufs] == [b.shape for b in empty_buffers(meta, torch.device("cpu"))]
    out = unpack(bufs, meta)
    assert list(out) == list(state) and state_hash(out) == state_hash(state)


def test_pack_refuses_a_state_of_another_layout():
    state = _state(0)
    meta = weights_meta(state)
    del state["steps"]
    with pytest.raises(ValueError, match="steps"):
        pack(state, meta, torch.device("cpu"))


def _member(rank, world, port, q):
    state = _state(0)
    group = SyncGroup("127.0.0.1", port, rank=rank, world=world, tag="t1", meta=weights_meta(state), timeout_s=60)
    if rank == 0:
        group.send(state)
        q.put((rank, None))
    else:
        q.put((rank, state_hash(group.receive())))


def test_broadcast_between_processes_gives_the_senders_state():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_member, args=(r, 3, port, q)) for r in range(3)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert got[1] == got[2] == state_hash(_state(0))
