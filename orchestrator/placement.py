"""Placement: which role runs on which node, as Ray placement groups.

Every role instance is one placement-group bundle ({"CPU": c, "GPU": g}):
- learners (GRPO PolicyLearner ranks, pretraining workers) in one PACK group: a node is filled
  before the next is used, so their collectives stay inside a node where they can;
- rollout samplers and reward evaluators in SPREAD groups: they use every node, and losing a node
  takes few of them (they restart into their rescheduled bundle elsewhere);
- expert-parallel samplers (`rollout.expert_parallel=K`) in groups of K, each group a placement
  group of its own: a group's members exchange tokens all-to-all at every decoding step, so a group
  shares one node (STRICT_PACK) wherever a node of the cluster is large enough for it; a group larger
  than any node (a 671B policy on 8-GPU nodes) spans the fewest nodes that hold it (PACK: whole
  nodes first), its all-to-all crossing the network. The groups are spread like single samplers.

`make_plan(roles, nodes)` simulates this placement on a cluster description and raises
`PlanError` with the reason when it cannot hold the roles; `sputnik plan --config FILE --nodes 4
--gpus-per-node 8` prints it. At run time `RolePlacement` checks the live cluster with the same
simulation (an embedded Ray cannot grow, so an impossible plan fails at once instead of waiting),
creates the groups and hands out per-actor scheduling options.

GPUs per learner and sampler: `cluster.gpus_per_learner` / `gpus_per_sampler`, default auto (one
each on a cluster with GPUs, none otherwise).

Multi-node runs need the run directory on storage every node sees: `check_shared_storage` refuses
a node-local path when the nodes are on more than one host.

Test: `pytest tests/orchestrator/test_orch_placement.py tests/orchestrator/test_orch_multinode.py`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

from orchestrator.config import ClusterConfig, ConfigError, RunConfig

# Filesystems every node of a cluster can share (as listed in /proc/mounts).
SHARED_FS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "9p", "fuse.s3fs",
             "fuse.gcsfuse", "fuse.mountpoint-s3", "fuse.juicefs", "fuse.sshfs", "wekafs", "efs")


class PlanError(ConfigError):
    """The roles do not fit the cluster; the message says why."""


@dataclasses.dataclass(frozen=True)
class Role:
    name: str
    count: int
    cpus: float
    gpus: float
    strategy: str  # "PACK" or "SPREAD"
    group: int = 1  # instances placed as one unit (expert-parallel samplers): one node if one can hold them; SPREAD applies to the groups

    def bundle(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}

    def describe(self) -> str:
        return f"{self.cpus:g} CPU" + (f" + {self.gpus:g} GPU" if self.gpus else "")

    def describe_group(self) -> str:
        return f"{self.group} x {self.describe()}" if self.group > 1 else self.describe()


@dataclasses.dataclass(frozen=True)
class Node:
    cpus: float
    gpus: float = 0.0
    name: str = ""


@dataclasses.dataclass
class Plan:
    roles: list[Role]
    nodes: list[Node]
    assignment: dict[str, list[int]]  # role name -> node index of each instance

    def nodes_of(self, role: str) -> list[int]:
        return self.assignment[role]

    def shape(self, role: str) -> list[int]:
        """How many instances of `role` share a node, largest first: what Ray's placement must give
        (which of several equal nodes it picks is Ray's choice)."""
        return sorted(Counter(self.assignment[role]).values(), reverse=True)

    def grouping(self, role: Role) -> str:
        """", in groups of K (on one node / spanning N nodes each)" for a role placed in groups."""
        if role.group == 1:
            return ""
        at = self.assignment[role.name]
        spans = max(len(set(at[k : k + role.group])) for k in range(0, len(at), role.group))
        return f", in groups of {role.group} " + ("on one node each" if spans == 1 else f"spanning up to {spans} nodes each")

    def table(self) -> str:
        """The plan as a fixed-width table: one row per node, one column per role."""
        names = [r.name for r in self.roles]
        head = ["node", "CPU", "GPU", *names, "CPU used", "GPU used"]
        rows = []
        for i, node in enumerate(self.nodes):
            counts = [sum(1 for n in self.assignment[r.name] if n == i) for r in self.roles]
            cpu = sum(c * r.cpus for c, r in zip(counts, self.roles))
            gpu = sum(c * r.gpus for c, r in zip(counts, self.roles))
            rows.append([node.name or f"node{i}", f"{node.cpus:g}", f"{node.gpus:g}", *map(str, counts), f"{cpu:g}", f"{gpu:g}"])
        widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        return "\n".join(fmt.format(*r).rstrip() for r in [head, ["-" * w for w in widths], *rows])


# ---------------------------------------------------------------------------------------------
# Roles of a run
# ---------------------------------------------------------------------------------------------


def _auto_gpus(value: float | None, cluster_gpus: float) -> float:
    return float(value) if value is not None else (1.0 if cluster_gpus > 0 else 0.0)


def roles_for(cfg: RunConfig, command: str, cluster_gpus: float) -> list[Role]:
    """The placement roles of `sputnik <command>` under `cfg` on a cluster with `cluster_gpus` GPUs."""
    c = cfg.cluster
    learner_gpus = _auto_gpus(c.gpus_per_learner, cluster_gpus)
    if command == "pretrain":
        return [Role("pretrain worker", cfg.pretrain.workers, c.cpus_per_learner, learner_gpus, "PACK")]
    if command == "sft":
        return [Role("sft worker", cfg.sft.workers, c.cpus_per_learner, learner_gpus, "PACK")]
    if command not in ("grpo", "eval", "demo"):
        raise ConfigError(f"sputnik plan: no placement for command {command!r} (grpo, eval, pretrain, sft or demo)")
    roles = [] if command == "eval" else [Role("learner", cfg.grpo.learners, c.cpus_per_learner, learner_gpus, "PACK")]
    if command != "eval" and cfg.grpo.kl_beta > 0 and cfg.grpo.reference == "actor":
        roles.append(Role("reference", 1, c.cpus_per_learner, learner_gpus, "PACK"))
    roles += [
        Role("sampler", cfg.rollout.num_samplers, c.cpus_per_sampler, _auto_gpus(c.gpus_per_sampler, cluster_gpus), "SPREAD",
             group=cfg.rollout.expert_parallel),
        Role("evaluator", cfg.grpo.num_evaluators, c.cpus_per_evaluator, 0.0, "SPREAD"),
    ]
    return roles


# ---------------------------------------------------------------------------------------------
# The simulation
# ---------------------------------------------------------------------------------------------

_EPS = 1e-9


def make_plan(roles: list[Role], nodes: list[Node]) -> Plan:
    """Place every instance as Ray would: PACK fills the fullest node that fits, SPREAD picks the
    node with the fewest instances of the role (then the most room). Raises PlanError."""
    if not nodes:
        raise PlanError("the cluster has no nodes")
    for role in roles:
        if role.count < 1:
            raise PlanError(f"{role.name}: count must be at least 1, got {role.count}")
        if not any(role.cpus <= n.cpus + _EPS and role.gpus <= n.gpus + _EPS for n in nodes):
            big = max(nodes, key=lambda n: (n.gpus, n.cpus))
            raise PlanError(f"one {role.name} needs {role.describe()}, but the largest node has {big.cpus:g} CPU + {big.gpus:g} GPU")
    need_cpu, need_gpu = sum(r.count * r.cpus for r in roles), sum(r.count * r.gpus for r in roles)
    have_cpu, have_gpu = sum(n.cpus for n in nodes), sum(n.gpus for n in nodes)
    need = ", ".join(f"{r.count} {r.name}(s) x {r.describe()}" for r in roles)
    if need_gpu > have_gpu + _EPS:
        raise PlanError(f"the roles need {need_gpu:g} GPUs ({need}) but the cluster has {have_gpu:g} "
                        f"({len(nodes)} node(s)); lower the counts or add nodes")
    if need_cpu > have_cpu + _EPS:
        raise PlanError(f"the roles need {need_cpu:g} CPUs ({need}) but the cluster has {have_cpu:g} "
                        f"({len(nodes)} node(s)); lower the counts or add nodes")
    free = [[n.cpus, n.gpus] for n in nodes]
    assignment: dict[str, list[int]] = {}
    for role in roles:
        placed: list[int] = []
        K = role.group  # a unit of K instances goes to one node, or spans nodes where none can hold it
        if K > 1 and spans_nodes(role, nodes):
            for k in range(0, role.count, K):
                placed += _span(role, free, f"group {k // K + 1} of {role.count // K}", len(nodes))
            assignment[role.name] = placed
            continue
        for k in range(0, role.count, K):
            fits = [i for i, (fc, fg) in enumerate(free) if K * role.cpus <= fc + _EPS and K * role.gpus <= fg + _EPS]
            if not fits:
                what = f"group {k // K + 1} of {role.count // K}" if K > 1 else f"{k + 1} of {role.count}"
                raise PlanError(f"{role.name} {what} ({role.describe_group()}) fits on no node after placing "
                                f"the others: the bundles do not pack into {len(nodes)} node(s) of this size")
            if role.strategy == "PACK":  # fill the node already used by this role, else the fullest
                used = [i for i in fits if i in placed]
                i = used[-1] if used else min(fits, key=lambda j: (free[j][1], free[j][0], j))
            else:
                i = min(fits, key=lambda j: (placed.count(j), -free[j][1] if role.gpus else 0, -free[j][0], j))
            free[i][0] -= K * role.cpus
            free[i][1] -= K * role.gpus
            placed += [i] * K
        assignment[role.name] = placed
    return Plan(roles, nodes, assignment)


def spans_nodes(role: Role, nodes: list[Node]) -> bool:
    """Whether a group of `role` is larger than every node, so that it spans nodes."""
    return not any(role.group * role.cpus <= n.cpus + _EPS and role.group * role.gpus <= n.gpus + _EPS for n in nodes)


def _span(role: Role, free: list[list[float]], what: str, n_nodes: int) -> list[int]:
    """Place one group across nodes as Ray's PACK does: the nodes with the most room first (fewest
    nodes), each filled before the next; `free` is updated. -> the node of each member."""
    room = [min(fc / role.cpus if role.cpus else role.group, fg / role.gpus if role.gpus else role.group) + _EPS
            for fc, fg in free]
    order = sorted(range(len(free)), key=lambda j: (-int(room[j]), j))
    out: list[int] = []
    for i in order:
        take = min(int(room[i]), role.group - len(out))
        out += [i] * take
        if len(out) == role.group:
            break
    if len(out) < role.group:
        raise PlanError(f"{role.name} {what} ({role.describe_group()}, spanning nodes) fits on no set of nodes after "
                        f"placing the others: the bundles do not pack into {n_nodes} node(s) of this size")
    for i in out:
        free[i][0] -= role.cpus
        free[i][1] -= role.gpus
    return out


# ---------------------------------------------------------------------------------------------
# At run time
# ---------------------------------------------------------------------------------------------


def live_nodes(ray) -> list[Node]:
    """The alive nodes of the connected Ray cluster, with their total CPU and GPU."""
    out = []
    for n in ray.nodes():
        if n.get("Alive"):
            res = n.get("Resources", {})
            out.append(Node(res.get("CPU", 0.0), res.get("GPU", 0.0), n.get("NodeManagerAddress", "") + ":" + n["NodeID"][:6]))
    return out


class RolePlacement:
    """Placement groups for the roles of one run; `options(role, i)` schedules instance i into its bundle."""

    def __init__(self, ray, roles: list[Role], *, autoscaling: bool, timeout_s: float):
        from ray.util.placement_group import placement_group

        self.ray, self.roles = ray, {r.name: r for r in roles}
        self.plan, nodes = None, live_nodes(ray)
        if not autoscaling:  # a fixed cluster: refuse an impossible plan now, with the reason
            self.plan = make_plan(roles, nodes)
        # per role its placement groups: one for the role, or one per group of instances that share a
        # node. Made role by role in the plan's order, each ready before the next is asked for, so a
        # later role's small bundle cannot take the room the plan keeps for an earlier role's group.
        self.groups: dict[str, list] = {}
        deadline = time.monotonic() + timeout_s
        try:
            for r in roles:
                one_node = "PACK" if spans_nodes(r, nodes) else "STRICT_PACK"  # a group larger than any node spans the fewest
                self.groups[r.name] = ([placement_group([r.bundle()] * r.count, strategy=r.strategy, name="")] if r.group == 1 else
                                       [placement_group([r.bundle()] * r.group, strategy=one_node, name="")
                                        for _ in range(r.count // r.group)])
                ray.get([g.ready() for g in self.groups[r.name]], timeout=max(deadline - time.monotonic(), 0.1))
        except ray.exceptions.GetTimeoutError:
            self.close()
            avail = ray.available_resources()
            raise PlanError(f"the cluster could not hold the roles within {timeout_s:g}s "
                            f"({', '.join(f'{r.count} {r.name}(s) x {r.describe()}' for r in roles)}; "
                            f"available now: {avail.get('CPU', 0):g} CPU, {avail.get('GPU', 0):g} GPU)") from None

    def options(self, role: str, index: int) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        r = self.roles[role]
        group, bundle = (0, index) if r.group == 1 else divmod(index, r.group)
        return {"num_cpus": r.cpus, "num_gpus": r.gpus, "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=self.groups[role][group], placement_group_bundle_index=bundle)}

    def close(self, wait_s: float = 30.0) -> None:
        """Remove the groups and wait (up to wait_s) until Ray has freed their resources: removal is
        asynchronous, and a placement made right after would otherwise find them still held."""
        from ray.util import placement_group_table
        from ray.util.placement_group import remove_placement_group

        removed = []
        for g in [g for gs in self.groups.values() for g in gs]:
            try:
                remove_placement_group(g)
                removed.append(g)
            except Exception:  # already gone with the cluster
                pass
        self.groups = {}
        deadline = time.monotonic() + wait_s
        try:
            while removed and time.monotonic() < deadline:
                removed = [g for g in removed if placement_group_table(g).get("state") != "REMOVED"]
                if removed:
                    time.sleep(0.05)
        except Exception:  # the cluster went away meanwhile: nothing left to wait for
            pass


def cluster_gpus(ray) -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


# ---------------------------------------------------------------------------------------------
# Shared storage
# ---------------------------------------------------------------------------------------------


def filesystem_type(path: str | Path) -> str:
    """The filesystem type of the mount holding `path` (from /proc/mounts; "" where unknown)."""
    p = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    mount = parts[1].replace("\\040", " ")
                    if (p == mount or p.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                        best, kind = mount, parts[2]
    except OSError:
        return ""
    return kind


def storage_problem(path: str, hosts: set[str], fs_type: str) -> str | None:
    """Why `path` cannot hold a run's checkpoints on a cluster whose nodes sit on `hosts`; None if it can."""
    if "://" in path or len(hosts) <= 1:  # a URI (s3://, gs://) or one machine: every node sees it
        return None
    if fs_type in SHARED_FS or fs_type.startswith("fuse."):
        return None
    return (f"{path} is on a node-local filesystem ({fs_type or 'unknown'}) but the cluster spans {len(hosts)} hosts; "
            f"put the run directory on shared storage (NFS, EFS, Lustre: --out /mnt/shared/runs/...) or set "
            f"cluster.storage_path=s3://...")


def check_shared_storage(ray, path: str | Path, *, key: str = "--out") -> None:
    """Raise ConfigError when `path` is node-local on a multi-host cluster: not on a shared
    filesystem type, and a file written here is not seen at the same path from every node (a bind
    mount, or nodes that share a machine, pass that probe)."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    hosts = {n.get("NodeManagerAddress", "") for n in alive}
    problem = storage_problem(str(path), hosts, filesystem_type(path) if "://" not in str(path) else "")
    if problem and not seen_from_every_node(ray, Path(path), [n["NodeID"] for n in alive]):
        raise ConfigError(f"{key}: {problem}")


def seen_from_every_node(ray, path: Path, node_ids: list[str], timeout_s: float = 120) -> bool:
    """Whether a file written in `path` here is read back from every node (one 0-CPU task each)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    marker = path / f".sputnik-shared-{token}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    except OSError:
        return False

    def read(p: str) -> str:
        try:
            return Path(p).read_text()
        except OSError:
            return ""

    task = ray.remote(num_cpus=0)(read)
    try:
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(str(marker)) for n in node_ids]
        return ray.get(refs, timeout=timeout_s) == [token] * len(node_ids)
    except ray.exceptions.GetTimeoutError:
        return False
    finally:
        marker.unlink(missing_ok=True)


def check_placement(ray, cluster: ClusterConfig, roles: list[Role]) -> Plan | None:
    """On a fixed-size cluster, the plan of `roles` on its live nodes, or PlanError with the reason
    at once (instead of waiting for resources that never come); None on an autoscaling cluster."""
    return None if cluster.autoscaling else make_plan(roles, live_nodes(ray))


# ---------------------------------------------------------------------------------------------
# `sputnik plan`
# ---------------------------------------------------------------------------------------------


def command_of(config_path: str) -> str:
    """Which command a config is for, from its file name: pretrain*, demo*, else grpo."""
    stem = Path(config_path).stem
    if stem.startswith("pretrain"):
        return "pretrain"
    if stem.startswith("demo"):
        return "demo"
    return "grpo"


def parse_node(text: str, i: int) -> Node:
    """`--node CPUS[:GPUS]`."""
    try:
        cpus, _, gpus = text.partition(":")
        node = Node(float(cpus), float(gpus or 0), f"node{i}")
    except ValueError:
        raise ConfigError(f"--node {text!r}: expected CPUS or CPUS:GPUS, e.g. 8 or 96:8") from None
    if node.cpus < 0 or node.gpus < 0:
        raise ConfigError(f"--node {text!r}: resources must not be negative")
    return node


def plan_nodes(cli_args) -> tuple[list[Node], str]:
    """The cluster `sputnik plan` plans for, and a line describing it."""
    if cli_args.plan_address:
        from orchestrator.config import ClusterConfig
        from orchestrator.ray_local import init_ray

        ray = init_ray(ClusterConfig(address=cli_args.plan_address))
        nodes = live_nodes(ray)
        return nodes, f"the {len(nodes)} node(s) of the Ray cluster at {cli_args.plan_address}"
    if cli_args.node_list:
        nodes = [parse_node(t, i) for i, t in enumerate(cli_args.node_list)]
        return nodes, f"{len(nodes)} node(s): " + ", ".join(f"{n.cpus:g} CPU + {n.gpus:g} GPU" for n in nodes)
    nodes_n, gpn = cli_args.nodes, cli_args.gpus_per_node
    if nodes_n < 1:
        raise ConfigError(f"--nodes must be at least 1, got {nodes_n}")
    if gpn < 0:
        raise ConfigError(f"--gpus-per-node must not be negative, got {gpn}")
    cpn = cli_args.cpus_per_node if cli_args.cpus_per_node is not None else (max(8, 24 * gpn) if gpn else 8)
    if cpn <= 0:
        raise ConfigError(f"--cpus-per-node must be positive, got {cpn}")
    return [Node(float(cpn), float(gpn), f"node{i}") for i in range(nodes_n)], f"{nodes_n} node(s) x {cpn:g} CPU + {gpn} GPU"


def run(cfg: RunConfig, cli_args) -> int:
    from orchestrator import memory_plan

    nodes, described = plan_nodes(cli_args)
    command = command_of(cli_args.config)
    commands = ["pretrain", "grpo"] if command == "demo" else [command]
    print(f"plan for {described}, config {cli_args.config}")
    for cmd in commands:  # the demo runs pretraining, then GRPO: the cluster holds one at a time
        roles = roles_for(cfg, cmd, sum(n.gpus for n in nodes))
        try:
            plan = make_plan(roles, nodes)
        except PlanError as e:
            print(f"sputnik plan: impossible for sputnik {cmd}: {e}", file=sys.stderr)
            return 2
        print(f"\nsputnik {cmd}: " + "; ".join(f"{r.count} {r.name}(s) x {r.describe()}, {r.strategy}{plan.grouping(r)}" for r in roles))
        print(plan.table())
        host_gib = getattr(cli_args, "host_memory_gib", None) or memory_plan.DEFAULT_HOST_GIB
        per_node = max(Counter(n for r in roles for n in plan.assignment[r.name]).values())  # CPU roles share a node's memory
        mems = memory_plan.role_memory(cfg, cmd, roles, gpu_gib=getattr(cli_args, "gpu_memory_gib", None) or memory_plan.DEFAULT_GPU_GIB,
                                       host_gib=host_gib / per_node, prompt_len=getattr(cli_args, "prompt_len", None) or 256,
                                       max_group=int(max(n.gpus for n in nodes)))
        print(f"\nmemory per rank (GiB) of sputnik {cmd}:")
        print(memory_plan.table(mems))
        print(memory_plan.explain(memory_plan.count_parameters(cfg.model)))
        problem = memory_plan.misfit(mems)
        if problem:
            print(f"sputnik plan: does not fit for sputnik {cmd}: {problem}", file=sys.stderr)
            return 2
    return 0
