"""Collective weight sync: learner rank 0 broadcasts the policy to the rollout samplers.

`grpo.weight_sync=collective` (the default, `auto`, picks it when the learners have GPUs) builds a
process group of its own, separate from the learners' torch.distributed group: rank 0 is learner
rank 0, ranks 1..S are the samplers. NCCL on GPUs, gloo on CPU, so the CPU tests run the same code
path as a GPU cluster. It is created from a TCPStore hosted by learner rank 0 and a process-group
constructor, not `init_process_group`, because each learner already has its default group (the
design of OpenRLHF's and verl's weight-update groups).

The state travels as one flat buffer per dtype, in the order of `weights_meta` (names, shapes,
dtypes), which the driver hands to every member when the group is made; a receiver checks the
sizes before it loads anything. A failed broadcast (a sampler died, a timeout) never loses the
update: the learner still returns the state as an ObjectRef, the driver falls back to the object
store for that sync and makes a fresh group (a new store prefix) for the next one.

Test: `pytest tests/orchestrator/test_orch_weight_sync.py` (gloo, real processes).
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

Meta = list[tuple[str, tuple[int, ...], str]]


def weights_meta(state: dict[str, torch.Tensor]) -> Meta:
    """(name, shape, dtype) of every tensor, in the order the buffers are packed."""
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()]


def _buckets(meta: Meta) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, (_, _, dtype) in enumerate(meta):
        out.setdefault(dtype, []).append(i)
    return out


def pack(state: dict[str, torch.Tensor], meta: Meta, device: torch.device) -> list[torch.Tensor]:
    """One contiguous buffer per dtype on `device`."""
    if [k for k, _, _ in meta] != list(state):
        missing = sorted(set(k for k, _, _ in meta) ^ set(state))
        raise ValueError(f"weight sync: the policy state does not match the group's layout (keys {missing[:3]} ...)")
    names = [k for k, _, _ in meta]
    return [torch.cat([state[names[i]].detach().reshape(-1) for i in idx]).to(device) for idx in _buckets(meta).values()]


def unpack(buffers: list[torch.Tensor], meta: Meta) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for buf, idx in zip(buffers, _buckets(meta).values()):
        off = 0
        for i in idx:
            name, shape, _ = meta[i]
            n = 1
            for s in shape:
                n *= s
            out[name] = buf[off : off + n].view(shape)
            off += n
    return {k: out[k] for k, _, _ in meta}


def empty_buffers(meta: Meta, device: torch.device) -> list[torch.Tensor]:
    sizes = []
    for dtype, idx in _buckets(meta).items():
        n = 0
        for i in idx:
            m = 1
            for s in meta[i][1]:
                m *= s
            n += m
        sizes.append(torch.empty(n, dtype=getattr(torch, dtype), device=device))
    return sizes


class SyncGroup:
    """One member of a weight-sync group; rank 0 hosts the store and sends."""

    def __init__(self, addr: str, port: int, *, rank: int, world: int, tag: str, meta: Meta, backend: str = "gloo",
                 timeout_s: float = 120.0):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"grpo.weight_sync: backend {backend!r} is neither gloo nor nccl")
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world, self.meta, self.backend = rank, world, meta, backend
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self._store = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=timeout)
        store = dist.PrefixStore(tag, self._store)
        if backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, world, opts)
        else:
            self.pg = dist.ProcessGroupGloo(store, rank, world, timeout)

    def _broadcast(self, buffers: list[torch.Tensor]) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        for buf in buffers:
            self.pg.broadcast([buf], opts).wait()
        if self.backend == "nccl":
            torch.cuda.synchronize(self.device)

    def send(self, state: dict[str, torch.Tensor]) -> None:
        assert self.rank == 0, "only rank 0 (learner 0) sends"
        self._broadcast(pack(state, self.meta, self.device))

    def receive(self) -> dict[str, torch.Tensor]:
        assert self.rank > 0, "rank 0 sends"
        buffers = empty_buffers(self.meta, self.device)
        self._broadcast(buffers)
        return unpack(buffers, self.meta)
