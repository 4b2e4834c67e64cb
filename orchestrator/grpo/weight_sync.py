"""Weight sync: the new policy reaches the rollout samplers after every update.

`WeightSync` is the driver's side. Each update every learner rank publishes its state (ZeRO-3
gathers on all ranks); rank 0's state becomes one ObjectRef, tagged with the policy version, which
every `generate` call names, so a restarted sampler loads it. Expert-parallel samplers
(`rollout.expert_parallel=K`, issue 21) get one ObjectRef per expert part instead, cut from that
state on learner 0's node (`model.parallel.expert_shard_state`): each member receives the
non-expert weights and its own E/K experts only, always through the object store. The samplers get it either from the
object store (the default on CPU) or by a broadcast from learner rank 0 (`grpo.weight_sync`
collective, the default on GPUs); a failed broadcast falls back to the object store for that
sync and makes a new group for the next.

The collective path builds a
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
import socket

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


def rendezvous() -> tuple[str, int]:
    """This node's address and a free port on it (run as a task inside learner 0's bundle)."""
    import ray

    addr = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((addr, 0))
        return addr, s.getsockname()[1]


def rendezvous_at(ray, placement, role: str = "learner", index: int = 0) -> tuple[str, int]:
    """An address and port on the node of `role` `index` (learner 0 by default), for a process group
    that instance hosts."""
    opts = {**placement.options(role, index), "num_cpus": 0, "num_gpus": 0}
    return ray.get(ray.remote(rendezvous).options(**opts).remote())


class WeightSync:
    """The driver's side of weight sync: the current policy version and its ObjectRef."""

    def __init__(self, ray, placement, learners: list, samplers: list, grpo_cfg, sampler_ep: int = 1):
        self.ray, self.placement, self.learners, self.samplers = ray, placement, learners, samplers
        self.timeout_s = grpo_cfg.sync_timeout_s
        self.version = 0
        self.weights_ref = None  # ObjectRef of the latest policy state (None: the init checkpoint)
        self.ep = sampler_ep  # samplers per model copy (rollout.expert_parallel)
        self._parts: list | None = None  # with ep > 1: weights_ref cut into one ObjectRef per expert part
        on_gpu = bool(learners) and ray.get(learners[0].device_type.remote()) == "cuda"
        # a broadcast sends everything to every sampler: expert-parallel samplers take their shards from the object store
        self.collective = bool(learners) and sampler_ep == 1 and (
            grpo_cfg.weight_sync == "collective" or (grpo_cfg.weight_sync == "auto" and on_gpu))
        self.groups = 0  # weight-sync groups made so far (a new one after a failed broadcast)
        self.fallbacks = 0  # syncs that went through the object store because a broadcast failed
        self.ready = self.collective and self.make_group()

    def make_group(self) -> bool:
        """A group of learner rank 0 (hosting the store) and the samplers; NCCL when all of them hold
        a GPU, gloo otherwise. False (with a warning) if it could not be made."""
        ray = self.ray
        metas = ray.get([l.weights_meta.remote() for l in self.learners])  # every rank: ZeRO-3 gathers
        devices = ray.get([self.learners[0].device_type.remote()] + [s.device_type.remote() for s in self.samplers])
        backend = "nccl" if all(d == "cuda" for d in devices) else "gloo"
        addr, port = rendezvous_at(ray, self.placement)
        self.groups += 1
        kw = dict(tag=f"weights{self.groups}", world=len(self.samplers) + 1, meta=metas[0], backend=backend, timeout_s=self.timeout_s)
        calls = [self.learners[0].join_sync_group.remote(addr, port, **kw)]
        calls += [s.join_sync_group.remote(addr, port, rank=i + 1, **kw) for i, s in enumerate(self.samplers)]
        try:
            ray.get(calls, timeout=self.timeout_s + 30)
        except Exception as e:
            print(f"grpo: could not make the weight-sync group ({type(e).__name__}: {str(e)[:200]}); syncing through the object store", flush=True)
            return False
        print(f"grpo: weight sync by {backend} broadcast from learner 0 to {len(self.samplers)} sampler(s)", flush=True)
        return True

    @property
    def sampler_weights(self):
        """What a `generate` call names: weights_ref, or with expert-parallel samplers one ObjectRef
        per expert part (None: the init checkpoint)."""
        if self.weights_ref is None or self.ep == 1:
            return self.weights_ref
        if self._parts is None:
            from model.parallel import expert_shard_state

            opts = {**self.placement.options("learner", 0), "num_cpus": 0, "num_gpus": 0}  # beside the state, on learner 0's node
            cut = self.ray.remote(expert_shard_state).options(**opts)
            self._parts = [cut.remote(self.weights_ref, part, self.ep) for part in range(self.ep)]
        return self._parts

    def sync(self, version: int) -> None:
        """Publish the learners' policy as `version` and bring every sampler to it."""
        ray = self.ray
        self.version = version
        if self.collective and not self.ready:
            self.ready = self.make_group()
        broadcast = self.collective and self.ready
        outs = [l.publish.options(num_returns=3).remote(broadcast) for l in self.learners]  # all ranks: ZeRO-3 gathers
        self.weights_ref, self._parts = outs[0][1], None
        lagging = list(range(len(self.samplers)))  # indexes of the samplers that still need the weights
        if broadcast:
            try:
                got = ray.get([s.receive_weights.remote(version) for s in self.samplers], timeout=self.timeout_s + 30)
                sent = ray.get(outs[0][2])
            except Exception as e:
                print(f"grpo: weight broadcast failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
                got, sent = [False] * len(self.samplers), False
            lagging = [i for i, ok in enumerate(got) if not (ok and sent)]
            if lagging:
                self.ready, self.fallbacks = False, self.fallbacks + 1
                print(f"grpo: {len(lagging)} sampler(s) missed the broadcast of version {version}: loading it from the object store, "
                      "and a new weight-sync group for the next step", flush=True)
        ray.get([o[0] for o in outs])
        if lagging:
            refs = self.sampler_weights
            ray.get([self.samplers[i].load_weights.remote(refs[i % self.ep] if self.ep > 1 else refs, version) for i in lagging])

    def metrics(self) -> dict:
        return {"weight_sync/collective": float(self.collective and self.ready), "weight_sync/fallbacks": self.fallbacks}
