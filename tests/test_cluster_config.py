"""cluster.yaml: Ray's own validation, the head's IAM policy, rsync filters, /dev/shm sizing, index pinning.

No cloud access: Ray's schema and node-provider code are read from the installed package, the rsync filter is
run through a real local rsync when one is installed (and through a faithful subset of rsync's exclude
rules, checked against it, when not).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
AWS = REPO / "deploy" / "aws"


def _config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    # `ray up` fills the provider's defaults, then validates against Ray's schema: do the same.
    prepared = prepare_config(_config())
    validate_config(prepared)
    assert prepared["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"


def test_the_validation_used_above_rejects_a_broken_config():
    config = _config()
    config["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    with pytest.raises(Exception, match="zero"):
        validate_config(prepare_config(config))


def test_gpu_workers_autoscale_from_zero_and_the_head_has_no_gpu():
    config = _config()
    nodes = config["available_node_types"]
    assert nodes["gpu_worker"]["min_workers"] == 0 and nodes["gpu_worker"]["max_workers"] > 0
    assert nodes["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert not nodes["head"]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert all("IamInstanceProfile" in node["node_config"] for node in nodes.values())
    assert any("raybackfill[gpu]" in command for command in config["setup_commands"])
    # Every node exports its metrics where Prometheus (and the Grafana dashboard) expect them.
    start = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert sum("--metrics-export-port=8080" in command for command in start) == 2


# ----------------------------------------------------------------------------- index pinning
def test_index_node_is_declared_only_by_nodes_the_autoscaler_never_removes():
    config = _config()
    pinned = {name: node for name, node in config["available_node_types"].items() if "index_node" in node["resources"]}
    assert config["head_node_type"] in pinned
    for name, node in pinned.items():
        if name != config["head_node_type"]:
            assert node["min_workers"] == node["max_workers"], f"{name} could be scaled down with shards on it"
    assert "index_node" not in config["available_node_types"]["gpu_worker"]["resources"]


# ----------------------------------------------------------------------------- IAM
def _policy(name: str) -> dict:
    policy = json.loads((AWS / name).read_text())
    assert policy["Version"] == "2012-10-17"
    return policy


def _allows(policy: dict, action: str, resource: str | None = None) -> bool:
    for statement in policy["Statement"]:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        if statement["Effect"] != "Allow" or not any(fnmatch.fnmatchcase(action, a) for a in actions):
            continue
        if resource is None or any(fnmatch.fnmatchcase(resource, r) for r in resources):
            return True
    return False


def _ray_aws_ec2_actions() -> set[str]:
    """The EC2 API actions Ray's AWS node provider (the autoscaler on the head) calls, read from its source."""
    import ray.autoscaler._private.aws.node_provider as provider

    source = Path(provider.__file__).read_text()
    calls = set(re.findall(r"\.(create_instances|create_tags|describe_\w+|\w+_instances)\b", source))
    if ".instances.filter(" in source:
        calls.add("describe_instances")
    boto_to_api = {"create_instances": "run_instances"}  # boto3's resource verb for RunInstances
    return {"ec2:" + "".join(w.title() for w in boto_to_api.get(c, c).split("_")) for c in calls}


def test_the_head_policy_allows_every_ec2_call_of_rays_autoscaler():
    actions = _ray_aws_ec2_actions()
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:DescribeInstances"} <= actions
    head = _policy("head-policy.json")
    assert [a for a in sorted(actions) if not _allows(head, a)] == []
    # Workers never launch anything.
    assert not any(_allows(_policy("worker-policy.json"), a) for a in actions)


def test_the_head_may_pass_the_role_of_every_worker_profile_and_nothing_else():
    config = _config()
    head = _policy("head-policy.json")
    workers = {
        node["node_config"]["IamInstanceProfile"]["Name"]
        for name, node in config["available_node_types"].items()
        if name != config["head_node_type"]
    }
    assert workers == {"raybackfill-worker"}
    for profile in workers:  # the README creates each role under its profile's name
        assert _allows(head, "iam:PassRole", f"arn:aws:iam::ACCOUNT_ID:role/{profile}")
    assert not _allows(head, "iam:PassRole", "arn:aws:iam::ACCOUNT_ID:role/raybackfill-head")
    assert not _allows(head, "iam:PassRole", "arn:aws:iam::ACCOUNT_ID:role/admin")
    head_profile = config["available_node_types"][config["head_node_type"]]["node_config"]["IamInstanceProfile"]
    assert head_profile == {"Name": "raybackfill-head"}


@pytest.mark.parametrize("policy", ["head-policy.json", "worker-policy.json"])
def test_every_node_reads_and_writes_the_bucket_and_only_it(policy):
    doc = _policy(policy)
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
        assert _allows(doc, action, "arn:aws:s3:::BUCKET/emb/part-00000.parquet")
        assert not _allows(doc, action, "arn:aws:s3:::another-bucket/x")
    assert _allows(doc, "s3:ListBucket", "arn:aws:s3:::BUCKET")
    assert not _allows(doc, "s3:DeleteBucket", "arn:aws:s3:::BUCKET")


# ----------------------------------------------------------------------------- /dev/shm
GIB = 1024**3


@pytest.mark.parametrize(("instance", "mem_available_kib"), [("g5.xlarge", 15_500_000), ("m6i.2xlarge", 31_000_000)])
def test_ray_sizes_dev_shm_from_each_nodes_memory(instance, mem_available_kib):
    """No fixed --shm-size: Ray's docker runner then derives it from the node's /proc/meminfo."""
    from ray._private.ray_constants import DEFAULT_OBJECT_STORE_MEMORY_PROPORTION
    from ray.autoscaler._private.command_runner import DockerCommandRunner

    docker = _config()["docker"]
    assert not any("--shm-size" in option for option in docker["run_options"])
    assert not docker.get("disable_shm_size_detection")
    for node in _config()["available_node_types"].values():
        assert not any("--shm-size" in o for o in node.get("docker", {}).get("worker_run_options", []))

    meminfo = f"MemTotal: {mem_available_kib + 400_000} kB\nMemAvailable: {mem_available_kib} kB\n".encode()
    node = SimpleNamespace(
        docker_config=docker,
        ssh_command_runner=SimpleNamespace(run=lambda command, with_output=False: meminfo),
    )
    options = DockerCommandRunner._auto_configure_shm(node, list(docker["run_options"]))  # type: ignore[arg-type]
    shm = float(re.fullmatch(r"--shm-size='([0-9.]+)b'", options[-1]).group(1))
    object_store = mem_available_kib * 1024 * DEFAULT_OBJECT_STORE_MEMORY_PROPORTION
    assert shm == pytest.approx(1.1 * object_store)  # room for the default object store, and 10% more
    assert shm < mem_available_kib * 1024 / 2  # never the whole RAM (the old fixed 16g was a g5.xlarge's RAM)


# ----------------------------------------------------------------------------- rsync filters
# Paths of a checkout after a local demo run: (path, whether `ray up` must copy it).
TREE = {
    ".venv/lib/python3.11/site-packages/ray/__init__.py": False,
    ".git/HEAD": False,
    ".pytest_cache/v/cache": False,
    ".ruff_cache/0.6/x": False,
    "demo-out/report.md": False,
    "demo-quick/plots/curve.png": False,
    "raybackfill-demo/models/new/model.json": False,
    "data/synth/part-00000.parquet": False,
    "runs/backbone/checkpoint": False,
    "results-quick.json": False,
    "raybackfill.egg-info/PKG-INFO": False,
    "raybackfill/index/__pycache__/router.cpython-311.pyc": False,
    "raybackfill/__init__.py": True,
    "raybackfill/data/storage.py": True,  # /data is anchored at the root: the package's data/ is kept
    "raybackfill/index/router.py": True,
    "jobs/backfill.py": True,
    "docs/results/digits.json": True,
    "pyproject.toml": True,
    "cluster.yaml": True,
    "README.md": True,
    ".gitignore": True,
}


def _make_tree(root: Path) -> None:
    for path in TREE:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("x")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")


def _rsync_regex(pattern: str) -> str:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i + 1)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def _rsync_matches(pattern: str, path: str, is_dir: bool) -> bool:
    """rsync's exclude-pattern rules (man rsync, "INCLUDE/EXCLUDE PATTERN RULES"), for the wildcards used here:
    a trailing / matches only directories; a leading / anchors at the transfer root (or at the directory of the
    merge file); a pattern with a / or ** elsewhere matches the end of the path at a component boundary; any
    other pattern matches the last component; * and ? stop at /, ** does not."""
    if pattern.endswith("/"):
        if not is_dir:
            return False
        pattern = pattern.rstrip("/")
    regex = _rsync_regex(pattern.lstrip("/"))
    if pattern.startswith("/"):
        return re.fullmatch(regex, path) is not None
    if "/" in pattern or "**" in pattern:
        return re.search(f"(^|/){regex}$", path) is not None
    return re.fullmatch(regex, path.rsplit("/", 1)[-1]) is not None


def _merge_rules(directory: Path, name: str) -> list[str]:
    """A dir-merge file's exclude patterns (blank lines and comments skipped, as rsync does)."""
    file = directory / name
    if not file.is_file():
        return []
    return [line.strip() for line in file.read_text().splitlines() if line.strip() and line[0] not in "#;"]


def _copied_by_the_subset(root: Path, excludes: list[str], merge_files: list[str]) -> set[str]:
    """The files rsync copies, walking top-down: an excluded directory is never entered."""
    copied: set[str] = set()

    def walk(directory: Path, scoped: list[tuple[str, list[str]]]) -> None:
        rel_dir = directory.relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir
        scoped = scoped + [(rel_dir, _merge_rules(directory, name)) for name in merge_files]
        for entry in sorted(directory.iterdir()):
            rel = entry.relative_to(root).as_posix()
            is_dir = entry.is_dir()
            excluded = any(_rsync_matches(p, rel, is_dir) for p in excludes) or any(
                _rsync_matches(p, rel[len(base) + 1 :] if base else rel, is_dir)
                for base, rules in scoped
                for p in rules
            )
            if excluded:
                continue
            if is_dir:
                walk(entry, scoped)
            else:
                copied.add(rel)

    walk(root, [])
    return copied


def _rsync_options() -> dict:
    config = _config()
    return {"rsync_exclude": config.get("rsync_exclude"), "rsync_filter": config.get("rsync_filter")}


def test_ray_up_copies_the_package_but_not_the_venv_caches_or_demo_outputs(tmp_path):
    config = _config()
    assert config["file_mounts"] == {"/home/ray/raybackfill": "."}
    src = tmp_path / "checkout"
    _make_tree(src)
    options = _rsync_options()
    copied = _copied_by_the_subset(src, options["rsync_exclude"], options["rsync_filter"])
    assert copied == {path for path, kept in TREE.items() if kept}


@pytest.mark.skipif(shutil.which("rsync") is None, reason="no rsync binary on this machine")
def test_the_same_filter_through_a_real_rsync_with_rays_own_arguments(tmp_path):
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    src, dst = tmp_path / "checkout", tmp_path / "node"
    _make_tree(src)
    args = SSHCommandRunner._create_rsync_filter_args(None, options=_rsync_options())  # type: ignore[arg-type]
    # What `ray up` runs, minus ssh: the file mount's source directory with a trailing slash.
    subprocess.run(["rsync", "-a", *args, f"{src}/", f"{dst}/"], check=True, capture_output=True)
    copied = {p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()}
    assert copied == {path for path, kept in TREE.items() if kept}
    # The subset above answers as rsync does on the same tree, excludes and merge files included.
    assert copied == _copied_by_the_subset(src, *_rsync_options().values())
