"""cluster.yaml against Ray's own cluster-launcher checks, with no cloud account and no network.

`ray up` loads the YAML, fills in the provider's defaults (`prepare_config`), asks AWS for instance
sizes, then runs `validate_config`: Ray's JSON schema (ray/autoscaler/ray-schema.json) plus a few
cross-field rules. These tests run the same steps except the AWS call, then check what Sputnik
relies on: the node types, the pinned installs every node runs, and the checkout being shipped.

    .venv/bin/python -m pytest tests/test_cluster_yaml.py -q
"""

import copy
import importlib.metadata
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
REMOTE_REPO = "/home/ubuntu/sputnik"
INSTALL = f"pip install -e {REMOTE_REPO}"


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())  # `ray up` reads it with yaml.safe_load too


def as_ray_up(config: dict) -> dict:
    """What `ray up` does before it contacts the cloud (commands._bootstrap_config), minus the
    AWS instance-type lookup that fills in missing `resources`."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def makefile_torch_version() -> str:
    m = re.search(r"^TORCH_VERSION \?= (\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert m, "Makefile has no TORCH_VERSION"
    return m.group(1)


def test_ray_up_accepts_cluster_yaml():
    prepared = as_ray_up(load())
    assert prepared["cluster_name"] == "sputnik"
    assert prepared["provider"]["type"] == "aws"


def _set(path: str, value):
    def mutate(c):
        *parents, key = path.split(".")
        for p in parents:
            c = c[p]
        c[key] = value
    return mutate


def _delete(path: str):
    def mutate(c):
        *parents, key = path.split(".")
        for p in parents:
            c = c[p]
        del c[key]
    return mutate


@pytest.mark.parametrize("mutate, error, match", [
    (_set("max_worker", 4), jsonschema.ValidationError, "'max_worker' was unexpected"),  # misspelt top-level key
    (_set("available_node_types.gpu_8xh100.min_worker", 1), jsonschema.ValidationError, "'min_worker' was unexpected"),
    (_delete("available_node_types.cpu_c7i.resources"), jsonschema.ValidationError, "'resources' is a required"),
    (_set("available_node_types.gpu_1xl4.resources.GPU", 0.5), jsonschema.ValidationError, "not of type 'integer'"),
    (_set("head_node_type", "head"), ValueError, "must be one of `available_node_types`"),
    (_set("available_node_types.cpu_c7i.min_workers", 100), ValueError, "smaller than the sum of `min_workers`"),
], ids=["top-level-typo", "node-type-typo", "no-resources", "fractional-gpu", "unknown-head-type", "min-over-max"])
def test_ray_up_rejects_a_broken_copy(mutate, error, match):
    config = load()
    mutate(config)
    with pytest.raises(error, match=match):
        as_ray_up(config)


def test_node_types_sputnik_places_roles_on():
    config = load()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["max_workers"] == 0 and "GPU" not in head["resources"]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    h100 = [t for t in workers.values() if t["resources"].get("GPU") == 8]
    assert h100 and h100[0]["node_config"]["InstanceType"] == "p5.48xlarge"
    assert any(0 < t["resources"].get("GPU", 0) < 8 for t in workers.values())  # a small GPU type
    assert any("GPU" not in t["resources"] and t["resources"].get("CPU", 0) > 0 for t in workers.values())  # evaluators
    assert all(t["min_workers"] == 0 for t in workers.values())  # nothing runs (or costs) until a job asks
    assert config["max_workers"] >= max(t["max_workers"] for t in workers.values())


def test_every_node_installs_pinned_torch_then_sputnik():
    # After Ray merges setup_commands into the head and worker lists: what each node really runs.
    prepared = as_ray_up(load())
    torch_version = makefile_torch_version()
    for role in ("head_setup_commands", "worker_setup_commands"):
        commands = prepared[role]
        assert set(re.findall(r"\btorch==([\w.]+)", " ".join(commands))) == {torch_version}, role
        first_torch = next(i for i, c in enumerate(commands) if f"torch=={torch_version}" in c)
        install = next(i for i, c in enumerate(commands) if c.startswith(INSTALL))
        assert first_torch < install, f"{role}: torch must be installed before sputnik"
    assert "boto3" in " ".join(prepared["head_setup_commands"])  # the autoscaler needs it on the head


def test_install_pins_every_dependency_within_pyproject_bounds():
    install = next(c for c in load()["setup_commands"] if c.startswith(INSTALL))
    pins = {}
    for token in shlex.split(install)[len(INSTALL.split()):]:
        req = Requirement(token)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"{token} is not an exact pin"
        pins[canonicalize_name(req.name)] = (req, spec[0].version)
    deps = [Requirement(d) for d in importlib.metadata.requires("sputnik") if "extra ==" not in d]
    for dep in deps:
        name = canonicalize_name(dep.name)
        assert name in pins, f"cluster.yaml does not pin {dep.name}"
        pin, version = pins[name]
        assert dep.specifier.contains(version), f"{pin} is outside pyproject's {dep}"
        assert dep.extras <= pin.extras, f"{pin} lacks the extras of {dep}"
    assert "default" in pins["ray"][0].extras  # `ray start --head` needs the dashboard


def test_file_mounts_ship_this_checkout():
    config = load()
    assert (REPO / config["file_mounts"][REMOTE_REPO]).resolve() == REPO  # `ray up` from the repo root
    assert ".gitignore" in config["rsync_filter"]  # so .venv/ and runs/ stay behind


def test_reward_nodes_run_ray_as_root_for_the_sandbox():
    # issue #17: the sandbox isolates fully only as root; the evaluators refuse to start otherwise
    config = load()
    types = config["available_node_types"]
    cpu = [t for name, t in types.items() if name != config["head_node_type"] and "GPU" not in t["resources"]]
    assert cpu
    marker = "/etc/sputnik/reward-node"
    for t in cpu:
        init = " ; ".join(t["initialization_commands"])
        assert "unshare" in init and "memory" in init and f"touch {marker}" in init
        assert "worker_setup_commands" not in t  # it would replace setup_commands (the installs) for the type
    for t in types.values():
        if "GPU" in t["resources"]:
            assert marker not in " ".join(t.get("initialization_commands", []))  # learners and samplers stay unprivileged
    start = " ".join(config["worker_start_ray_commands"])
    assert f"[ -e {marker} ]" in start and 'sudo -n env PATH="$PATH"' in start
    root_branch = start.split("then", 2)[2].split("else")[0]
    assert "ray start --address=$RAY_HEAD_IP:6379" in root_branch and 'RAY_HEAD_IP="$RAY_HEAD_IP"' in root_branch
    assert "ulimit -n 65536" in root_branch
    assert "rewards.isolation" in CLUSTER_YAML.read_text()  # the comments name the opt-out
    prepared = as_ray_up(config)  # still what `ray up` accepts
    assert prepared["available_node_types"]["cpu_c7i"]["initialization_commands"]
