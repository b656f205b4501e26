"""End-to-end on real Ray clusters started in child processes, never in the pytest process.

The session fixture ``ray_cluster`` may own a Ray cluster in this process, and other developers run
test clusters on the same machine, so these tests touch neither: every Ray process here is started by
a subprocess with its own RAY_TMPDIR, the pytest process never sets RAY_ADDRESS nor calls ``ray.init``,
and cleanup kills only the process group we started (``ray stop`` would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
INDEX = "rb-integration"
# What `ray job submit` must not upload (gitignore syntax: a leading / anchors at the repo root).
EXCLUDES = [".venv", "/data", "/runs", "/demo-out", ".pytest_cache", ".ruff_cache", "__pycache__"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(ray_tmpdir: str, address: str | None = None) -> dict[str, str]:
    """The environment of every child: our venv first, no auth on loopback, its own temp dir."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(REPO),
        RAY_AUTH_MODE="disabled",
        RAY_TMPDIR=ray_tmpdir,
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        OMP_NUM_THREADS="1",
        # On a loaded machine the node agents take longer than the raylet's default wait (it then aborts).
        RAY_agent_register_timeout_ms="120000",
    )
    if address:
        env["RAY_ADDRESS"] = address
    return env


def _ray_daemons(temp_dir: str, ours: bool) -> set[int]:
    """Ray daemons (raylet, gcs_server) on this machine whose session is (or is not) under ``temp_dir``."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() not in ("raylet", "gcs_server"):
                continue
            if (temp_dir in (proc / "cmdline").read_bytes().decode(errors="replace")) == ours:
                pids.add(int(proc.name))
        except OSError:
            continue  # exited meanwhile
    return pids


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_group(pgid: int, grace_s: float = 10.0) -> None:
    """SIGTERM the group (``ray start --block`` then stops its daemons), SIGKILL what is left."""
    if not _group_alive(pgid):
        return
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.2)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.2)


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _submit(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the dashboard listens but its node agent has not registered yet."""
    deadline = time.monotonic() + 60
    while True:
        done = _run(cmd, env, timeout)
        if "No available agent" not in done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(1)


def _wait_for_dashboard(head: subprocess.Popen, port: int, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise AssertionError(f"`ray start --head` exited with {head.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the dashboard did not listen on 127.0.0.1:{port} within {timeout_s} s")


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_jobs_submitted_to_a_loopback_head_serve_an_index_that_another_process_queries(tmp_path):
    gcs_port, dashboard_port = _free_port(), _free_port()
    # Every fixed default port too: other developers' clusters on this machine hold the defaults.
    agent_ports = [
        arg
        for flag in (
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--metrics-export-port",
            "--runtime-env-agent-port",
            "--ray-client-server-port",
        )
        for arg in (flag, str(_free_port()))
    ]
    ray_tmpdir = tempfile.mkdtemp(prefix="rbi", dir="/tmp")  # short: unix socket paths are limited
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(gcs_port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard_port),
            "--num-cpus",
            "2",
            "--include-dashboard",
            "true",
            "--disable-usage-stats",
            *agent_ports,
        ],
        env=_child_env(ray_tmpdir),
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pgid = head.pid  # start_new_session: the head is its group's leader; Ray's daemons inherit the group
    try:
        _wait_for_dashboard(head, dashboard_port)
        ours = _ray_daemons(ray_tmpdir, ours=True)
        assert ours and all(os.getpgid(p) == pgid for p in ours), "the head's daemons left our process group"

        submit = [
            RAY,
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{dashboard_port}",
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            json.dumps({"excludes": EXCLUDES}),
            "--",
        ]
        env = _child_env(ray_tmpdir)
        images, model, embeddings = tmp_path / "images", tmp_path / "old", tmp_path / "emb_old"
        stages = [
            [
                "python",
                "jobs/prepare_data.py",
                "synth",
                "--out",
                str(images),
                "--classes",
                "4",
                "--per-class",
                "5",
                "--size",
                "16",
            ],
            [
                "python",
                "jobs/train.py",
                "backbone",
                "--images",
                str(images),
                "--out",
                str(model),
                "--architecture",
                "small_cnn",
                "--embedding-dim",
                "16",
                "--workers",
                "0",
                "--epochs",
                "1",
                "--batch-size",
                "10",
                "--no-gpu",
                "--storage",
                str(tmp_path / "runs"),
                "--validation-fraction",
                "0",
            ],  # job plumbing: 20 images cannot tell whether a model learned
            [
                "python",
                "jobs/embed.py",
                "--gallery",
                str(images),
                "--model",
                str(model),
                "--out",
                str(embeddings),
                "--actors",
                "1",
                "--cpus-per-actor",
                "0.5",
                "--batch-size",
                "10",
            ],
            ["python", "jobs/serve.py", "--old-embeddings", str(embeddings), "--shards", "2", "--name", INDEX],
        ]
        for stage in stages:
            started = time.monotonic()
            done = _submit(submit + stage, env, timeout=180)
            print(f"{stage[1]}: exit {done.returncode} after {time.monotonic() - started:.1f} s")
            assert done.returncode == 0, f"{stage[1]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            assert "succeeded" in done.stdout, done.stdout[-3000:]
        assert "serving 20 items" in done.stdout

        ids = sorted(pq.read_table(embeddings, columns=["id"]).column("id").to_pylist())
        client = _child_env(ray_tmpdir, address=f"127.0.0.1:{gcs_port}")
        cli = [sys.executable, "-m", "raybackfill.cli.main"]
        status = _run([*cli, "status", "--name", INDEX], client, timeout=90)
        assert status.returncode == 0, status.stderr[-3000:]
        assert f"index {INDEX}   phase idle" in status.stdout
        all_shards = next(line for line in status.stdout.splitlines() if line.startswith("all "))
        assert all_shards.split() == ["all", "20", "0", "0", "20"]  # every item old, none moved yet

        query = _run(
            [*cli, "query", "--id", str(ids[7]), "--k", "3", "--strategy", "old", "--json", "--name", INDEX],
            client,
            timeout=90,
        )
        assert query.returncode == 0, query.stderr[-3000:]
        hits = json.loads(query.stdout)[0]
        assert len(hits) == 3 and hits[0]["id"] == ids[7] and {h["space"] for h in hits} == {"old"}
        assert {h["id"] for h in hits} <= set(ids)

        _backfill_with_a_user_entrypoint(tmp_path, dashboard_port, env, client, images, embeddings)
    finally:
        others = _ray_daemons(ray_tmpdir, ours=False)
        _kill_group(pgid)
        head.wait(timeout=30)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    assert not _group_alive(pgid), "Ray processes of the test head survived the cleanup"
    assert others <= _ray_daemons(ray_tmpdir, ours=False), "the cleanup stopped Ray processes it did not start"


USER_ENCODER = textwrap.dedent(
    """
    import numpy as np


    class Projection:
        def __init__(self, dim):
            self.weights = np.random.default_rng(0).standard_normal((3 * 16 * 16, dim)).astype(np.float32)

        def __call__(self, pixels):
            return pixels.reshape(len(pixels), -1) @ self.weights


    def make(dim=8):
        return Projection(dim)
    """
)


def _backfill_with_a_user_entrypoint(
    tmp_path: Path, dashboard_port: int, env: dict, client: dict, images: Path, embeddings: Path
) -> None:
    """The team's own encoder, a factory in the directory they submit from, backfills the live index; the same
    job without --trust-entrypoint is refused before anything runs."""
    user_dir = tmp_path / "team"
    user_dir.mkdir()
    first = pq.read_table(images, columns=["image"]).column("image")[0].as_py()
    (tmp_path / "query.png").write_bytes(first)
    (user_dir / "team_encoder.py").write_text(USER_ENCODER)
    encoder = tmp_path / "team-v2"
    register = subprocess.run(
        [
            sys.executable,
            "-m",
            "raybackfill.cli.main",
            "encoder",
            "register",
            "--kind",
            "entrypoint",
            "--entrypoint",
            "team_encoder:make",
            "--kwargs",
            '{"dim": 8}',
            "--crop",
            "16",
            "--version",
            "team-v2",
            "--out",
            str(encoder),
        ],
        env=client,
        cwd=user_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )  # python -m: the cwd is importable
    assert register.returncode == 0, register.stderr[-3000:]
    submit = [
        RAY,
        "job",
        "submit",
        "--address",
        f"http://127.0.0.1:{dashboard_port}",
        "--working-dir",
        str(user_dir),
        "--",
        "python",
        str(REPO / "jobs" / "backfill.py"),
        "--gallery",
        str(images),
        "--old-embeddings",
        str(embeddings),
        "--upgrade",
        str(encoder),
        "--method",
        "bct",
        "--policy",
        "random",
        "--tiers",
        "2",
        "--index",
        INDEX,
        "--batch-size",
        "8",
        "--no-progress",
    ]
    refused = _submit([*submit, "--out", str(tmp_path / "refused")], env, timeout=180)
    assert refused.returncode != 0 and "names the entrypoint 'team_encoder:make'" in refused.stdout + refused.stderr
    assert not (tmp_path / "refused").exists()
    done = _submit(
        [*submit, "--out", str(tmp_path / "backfill"), "--trust-entrypoint", "team_encoder:make"], env, timeout=240
    )
    assert done.returncode == 0, f"backfill failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    status = _run([sys.executable, "-m", "raybackfill.cli.main", "status", "--name", INDEX], client, timeout=90)
    all_shards = next(line for line in status.stdout.splitlines() if line.startswith("all "))
    assert all_shards.split() == ["all", "0", "0", "20", "20"], status.stdout  # every item re-embedded by team-v2
    query = _run(
        [
            sys.executable,
            "-m",
            "raybackfill.cli.main",
            "query",
            "--image",
            str(tmp_path / "query.png"),
            "--model",
            str(encoder),
            "--strategy",
            "compatible",
            "--k",
            "3",
            "--json",
            "--name",
            INDEX,
            "--trust-entrypoint",
            "team_encoder:make",
        ],
        {**client, "PYTHONPATH": f"{user_dir}:{REPO}"},
        timeout=90,
    )
    assert query.returncode == 0, query.stderr[-3000:]
    hits = json.loads(query.stdout)[0]
    assert len(hits) == 3 and {h["space"] for h in hits} == {"new"}


# Run in a child process: ray.cluster_utils.Cluster would otherwise collide with the session's Ray here.
TWO_NODE_SCRIPT = textwrap.dedent(
    """
    import json

    import numpy as np
    import ray
    from ray.cluster_utils import Cluster

    from raybackfill import NAMESPACE
    from raybackfill.index.router import RouterConfig, create_index, destroy_index, get

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for resource in ("node_a", "node_b"):
            cluster.add_node(num_cpus=1, resources={resource: 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        # One whole CPU per shard on two 1-CPU workers (the head has none): each node fits exactly one shard.
        config = RouterConfig(name="rb-two-nodes", shards=2, shard_num_cpus=1.0)
        router = create_index(config)
        rng = np.random.default_rng(0)
        vectors = rng.normal(size=(40, 8)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = np.arange(100, 140, dtype=np.int64)
        counts = get(router.load_old.remote(ids, vectors, "v-old"))
        top = get(router.search.remote(vectors[[5, 30]], None, 3, "old"))
        per_shard = get(router.progress.remote()).per_shard
        node_of = lambda shard: ray.get_runtime_context().get_node_id()
        shard_nodes = [ray.get(ray.get_actor(config.shard_name(i), namespace=NAMESPACE).__ray_call__.remote(node_of))
                       for i in range(config.shards)]
        labels = {n["NodeID"]: next((r for r in ("node_a", "node_b") if r in n["Resources"]), "head")
                  for n in ray.nodes() if n["Alive"]}
        destroy_index(config.name)
        print("RESULT " + json.dumps({
            "counts": counts,
            "per_shard_old": [c["old"] for c in per_shard],
            "top_ids": top.ids.tolist(),
            "shard_nodes": shard_nodes,
            "shard_labels": [labels[n] for n in shard_nodes],
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_index_shards_of_a_two_node_cluster_run_on_different_nodes_and_answer_together():
    ray_tmpdir = tempfile.mkdtemp(prefix="rbc", dir="/tmp")
    child = subprocess.Popen(
        [sys.executable, "-c", TWO_NODE_SCRIPT],
        env=_child_env(ray_tmpdir),
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = child.communicate(timeout=200)
    finally:
        _kill_group(child.pid)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    assert child.returncode == 0, err[-3000:]
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])
    assert len(set(result["shard_nodes"])) == 2
    assert sorted(result["shard_labels"]) == ["node_a", "node_b"]
    assert result["counts"]["old"] == 40
    assert all(n > 0 for n in result["per_shard_old"]) and sum(result["per_shard_old"]) == 40
    # Each query's own vector is its nearest neighbour, whichever shard holds it.
    assert [row[0] for row in result["top_ids"]] == [105, 130]
