"""The index's metrics reach Ray's Prometheus endpoint and move during a real backfill.

A child process starts its own local Ray node with a known metrics export port (never in the pytest process,
which may own the session's cluster), creates an index pinned to a custom ``index_node`` resource, loads a
gallery, and runs a real backfill (a BCT model over synthetic images) in two budgeted runs, then searches
and makes one refused upsert. After each step this test scrapes ``http://127.0.0.1:PORT/metrics`` until the
values of that step show up: processes push their metrics to the node's agent every report interval, so the
test polls (with a deadline) instead of sleeping a fixed time.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from raybackfill.index.metrics import (
    ERRORS,
    ETA,
    ITEMS,
    PHASE,
    QUERIES,
    QUERY_SECONDS,
    RATE,
    REMAINING,
    SHARD_ITEMS,
    SHARD_SEARCH_SECONDS,
    SHARD_WRITTEN,
    WRITE_SECONDS,
    WRITTEN,
    exported_names,
)

REPO = Path(__file__).resolve().parents[1]
INDEX = "rb-metrics"
N = 16
BUDGET = 6

CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import ray
    import torch
    from raybackfill import NAMESPACE
    from raybackfill.backfill.run import BackfillConfig, run_backfill
    from raybackfill.data.schema import embedding_table
    from raybackfill.data.storage import write_table
    from raybackfill.data.synth import synthesize
    from raybackfill.embed.pipeline import PoolConfig
    from raybackfill.index.router import IndexSearcher, RouterConfig, create_index, get
    from raybackfill.models.artifacts import ModelSpec, save_model
    from raybackfill.models.registry import build_model

    port, root, name, n, budget = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    write_table(synthesize(classes=4, per_class=n // 4, size=16), f"{root}/gallery", rows_per_shard=8)
    old = np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32)
    write_table(embedding_table(np.arange(n), old, model="old-v1"), f"{root}/old", rows_per_shard=8)
    spec = {"embedding_dim": 8, "num_classes": 4, "width": 4}
    save_model(build_model("small_cnn", **spec), f"{root}/new", ModelSpec("small_cnn", "new-v2", spec))

    ray.init(num_cpus=2, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False,
             object_store_memory=300 * 1024**2, resources={"index_node": 1}, _metrics_export_port=port)
    router = create_index(RouterConfig(name=name, shards=2, shard_num_cpus=0.1, node_resource="index_node"))
    config = BackfillConfig(gallery=f"{root}/gallery", old_embeddings=f"{root}/old", upgrade=f"{root}/new",
                            out=f"{root}/out", method="bct", policy="id", tiers=2, budget=budget, index=name,
                            pool=PoolConfig(batch_size=4), progress=False)
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((2, 8)).astype(np.float32)

    def done(step, **extra):
        p = get(router.progress.remote())
        print(json.dumps({"step": step, "counts": p.counts, "phase": p.phase, "rate": p.rate,
                          "eta": p.eta_seconds, **extra}), flush=True)

    done("created", index_node=ray.available_resources().get("index_node"))
    for line in sys.stdin:
        step = line.strip()
        if step == "load":
            get(router.load_old.remote(np.arange(n), old, "old-v1"))
            done(step)
        elif step == "backfill":
            summary = run_backfill(config)
            done(step, complete=summary.complete)
        elif step == "search":
            get(router.search.remote(queries, None, 3, "old"))
            get(router.search.remote(queries, queries, 3, "rank_merge"))
            get(router.search.remote(None, queries, 3, "compatible"))
            done(step)
        elif step == "searcher":  # the same searches from this process, without the router
            searcher = IndexSearcher.connect(name)
            searcher.search(queries, None, 3, "old")
            searcher.search(queries, queries, 3, "rank_merge")
            searcher.search(None, queries, 3, "compatible")
            done(step)
        elif step == "refused":
            try:
                get(router.upsert.remote(np.arange(2), old[:2], "new", "another-version"))
            except ValueError as err:
                done(step, error=str(err))
        elif step == "quit":
            break
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


Series = dict[tuple[str, frozenset], float]


def _scrape(port: int) -> Series:
    """Every sample of our index on the node's Prometheus endpoint, summed over Ray's per-process labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    ours: Series = defaultdict(float)
    ray_labels = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "JobId"}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("index") != INDEX:
                continue
            labels = {k: v for k, v in sample.labels.items() if k not in ray_labels and not k.startswith("otel_")}
            labels.pop("index")
            ours[(sample.name, frozenset(labels.items()))] += sample.value
    return ours


def _value(series: Series, name: str, **labels: str) -> float | None:
    """The sum of the samples named ``name`` whose labels include ``labels`` (None if there is none)."""
    values = [v for (n, ls), v in series.items() if n == name and set(labels.items()) <= ls]
    return sum(values) if values else None


def _wait_for(port: int, check: Callable[[Series], bool], what: str, timeout_s: float = 180.0) -> Series:
    deadline = time.monotonic() + timeout_s
    series: Series = {}
    while time.monotonic() < deadline:
        try:
            series = _scrape(port)
        except OSError:
            series = {}  # the agent is not listening yet
        if series and check(series):
            return series
        time.sleep(0.5)
    shown = "\n".join(f"{n}{dict(ls)} {v}" for (n, ls), v in sorted(series.items(), key=str))
    raise AssertionError(f"metrics never showed {what}; last scrape:\n{shown}")


class Child:
    """The driver process: one JSON line per finished step on stdout."""

    def __init__(self, port: int, root: str, env: dict[str, str], log) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(port), root, INDEX, str(N), str(BUDGET)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            cwd=REPO,
            text=True,
            start_new_session=True,
        )

    def read(self, timeout_s: float = 600.0) -> dict:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    raise AssertionError(f"the driver exited with {self.proc.wait()}")
                if line.startswith("{"):
                    return json.loads(line)
            elif self.proc.poll() is not None:
                raise AssertionError(f"the driver exited with {self.proc.returncode}")
        raise AssertionError("the driver did not finish its step in time")

    def step(self, name: str) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        result = self.read()
        assert result["step"] == name, result
        return result

    def stop(self) -> None:
        """End the driver (its ray.init cluster goes with it), then anything left in its process group."""
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_router_and_shard_metrics_reach_prometheus_and_move_during_a_backfill(tmp_path):
    port = _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rbm-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        PYTHONPATH=str(REPO),
        RAY_TMPDIR=ray_tmp,
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        OMP_NUM_THREADS="1",
        # Push metrics to the agent every second (default 10 s): the test only waits less; it polls either way.
        RAY_metrics_report_interval_ms="1000",
        RAY_agent_register_timeout_ms="120000",
    )
    items, remaining, rate, eta, phase = (exported_names(s)[0] for s in (ITEMS, REMAINING, RATE, ETA, PHASE))
    written, shard_items, shard_written = (exported_names(s)[0] for s in (WRITTEN, SHARD_ITEMS, SHARD_WRITTEN))
    queries, errors = exported_names(QUERIES)[0], exported_names(ERRORS)[0]
    query_count = exported_names(QUERY_SECONDS)[2]
    write_count, shard_search_count = exported_names(WRITE_SECONDS)[2], exported_names(SHARD_SEARCH_SECONDS)[2]

    with open(tmp_path / "driver.log", "w") as log:
        child = Child(port, str(tmp_path), env, log)
        try:
            created = child.read()
            # The router and both shards hold a sliver of the node's index_node resource.
            assert created["index_node"] == pytest.approx(1 - 3 * 0.001)

            child.step("load")
            _wait_for(
                port,
                lambda s: (
                    _value(s, items, state="old") == N
                    and _value(s, shard_items, state="old") == N  # summed over the two shards
                    and _value(s, written, operation="load_old", state="old") == N
                    and _value(s, phase, phase="idle") == 1
                ),
                "the loaded gallery",
            )

            first = child.step("backfill")
            assert first["counts"]["new"] == BUDGET
            seen = _wait_for(
                port,
                lambda s: (
                    _value(s, items, state="new") == BUDGET
                    and _value(s, items, state="old") == N - BUDGET
                    and _value(s, written, operation="upsert", state="new") == BUDGET
                    and _value(s, shard_written, operation="upsert") == BUDGET
                    and _value(s, phase, phase=first["phase"]) == 1
                    and _value(s, remaining) == N - BUDGET
                ),
                "the first budgeted backfill run",
            )
            # The gauges hold the router's last progress view (the driver's progress() call after the run).
            assert _value(seen, rate) == pytest.approx(first["rate"], abs=1e-6)
            assert _value(seen, eta) == (-1 if first["eta"] is None else pytest.approx(first["eta"]))
            assert _value(seen, write_count, operation="upsert") >= 1

            second = child.step("backfill")
            assert second["counts"]["new"] == 2 * BUDGET
            _wait_for(
                port,
                lambda s: (
                    _value(s, items, state="new") == 2 * BUDGET
                    and _value(s, written, operation="upsert", state="new") == 2 * BUDGET
                    and _value(s, remaining) == N - 2 * BUDGET
                ),
                "the second run's progress",
            )

            child.step("search")
            seen = _wait_for(
                port,
                # Each shard process reports on its own clock, so wait for all three reporters, not just the router.
                lambda s: (
                    all(_value(s, query_count, strategy=k) == 1 for k in ("old", "rank_merge", "compatible"))
                    and _value(s, shard_search_count) is not None
                    and _value(s, shard_search_count) >= 2 * 3
                ),
                "one timed search per strategy, reaching both shards",
            )
            assert all(_value(seen, queries, strategy=k) == 2 for k in ("old", "rank_merge", "compatible"))
            assert _value(seen, shard_search_count) == 2 * 3  # every search reaches both shards, exactly once

            child.step("searcher")
            seen = _wait_for(
                port,
                lambda s: (
                    all(_value(s, query_count, strategy=k) == 2 for k in ("old", "rank_merge", "compatible"))
                    and _value(s, shard_search_count) == 2 * 6
                ),
                "the searcher's searches, counted like the router's",
            )
            assert all(_value(seen, queries, strategy=k) == 4 for k in ("old", "rank_merge", "compatible"))

            refused = child.step("refused")
            assert "another-version" in refused["error"]
            _wait_for(
                port,
                lambda s: _value(s, errors, operation="upsert", error="ValueError") == 1,
                "the refused upsert",
            )
        finally:
            child.stop()
            shutil.rmtree(ray_tmp, ignore_errors=True)
