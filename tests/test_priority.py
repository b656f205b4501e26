"""Background work runs below the queries: the nice helpers (in a subprocess, since lowering a process cannot be
undone), the embedding actors' own threads in a real Ray worker, and PoolConfig reaching the actors of a Ray Data
stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import ray
import torch

from raybackfill.embed import pipeline
from raybackfill.embed.actors import TransformEmbeddings
from raybackfill.embed.pipeline import PoolConfig
from raybackfill.index.shard import IndexConfig
from raybackfill.models.artifacts import ModelSpec, save_model
from raybackfill.models.registry import build_model
from raybackfill.priority import MAX_NICE, BackgroundPriority, check_nice_increment, lower_thread_priority

linux_only = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="per-thread nice is a Linux property")


def thread_nices() -> dict[int, int]:
    """Nice value of every thread of this process."""
    return {int(t): os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")}


@pytest.mark.parametrize("bad", [-1, MAX_NICE + 1, 2.5, True, "4"])
def test_nice_increments_outside_0_to_19_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"nice_increment must be an integer in \[0, 19\]"):
        check_nice_increment(bad, "nice_increment")
    with pytest.raises(ValueError, match="nice_increment"):
        PoolConfig(nice_increment=bad)
    with pytest.raises(ValueError, match="write_nice_increment"):
        IndexConfig(write_nice_increment=bad)
    assert check_nice_increment(0, "x") == 0 and check_nice_increment(MAX_NICE, "x") == MAX_NICE


@linux_only
def test_lower_thread_priority_moves_the_calling_thread_only():
    main = os.getpriority(os.PRIO_PROCESS, os.getpid())
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: dict[str, object] = {}

    def worker() -> None:
        seen["ok"] = lower_thread_priority(3)
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        seen["again"] = lower_thread_priority(3)  # idempotent: not 3 more steps
        seen["nice_again"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == {"ok": True, "nice": min(MAX_NICE, main + 3), "again": True, "nice_again": min(MAX_NICE, main + 3)}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
    assert lower_thread_priority(0) is True  # 0: nothing to do


BACKGROUND_SCRIPT = textwrap.dedent(
    """
    import json, os, threading
    from raybackfill.priority import BackgroundPriority

    def nices():
        return {int(t): os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")}

    stop = threading.Event()
    early = threading.Thread(target=stop.wait)
    early.start()
    base = os.getpriority(os.PRIO_PROCESS, os.getpid())
    priority = BackgroundPriority(INCREMENT)
    first = priority.apply()
    after_first = nices()
    late = threading.Thread(target=stop.wait)
    late.start()
    before_second = nices()[late.native_id]
    second = priority.apply()
    third = priority.apply()
    out = {"base": base, "target": priority.target, "first": first, "after_first": after_first,
           "late_before": before_second, "second": second, "third": third, "final": nices(),
           "late": late.native_id}
    stop.set(); early.join(); late.join()
    print(json.dumps(out))
    """
)


@linux_only
@pytest.mark.parametrize("increment", [3, 40])
def test_background_priority_lowers_every_thread_of_the_process_and_later_ones(increment):
    if increment > MAX_NICE:  # refused before any thread is touched
        with pytest.raises(ValueError, match="nice_increment"):
            BackgroundPriority(increment)
        return
    script = BACKGROUND_SCRIPT.replace("INCREMENT", str(increment))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    out = json.loads(done.stdout)
    target = min(MAX_NICE, out["base"] + increment)
    assert out["target"] == target
    assert out["first"] == len(out["after_first"]) >= 2  # the main thread and the early one, at least
    assert set(out["after_first"].values()) == {target}
    assert out["late_before"] == target  # a thread inherits its creator's nice on Linux ...
    assert out["second"] == 1 and out["third"] == 0  # ... and is still visited once, then left alone
    assert set(out["final"].values()) == {target}


@pytest.fixture(scope="module")
def fct_model(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("priority") / "fct")
    kwargs = {"old_dim": 4, "new_dim": 4, "hidden_dim": 8, "mixer_dim": 8}
    torch.manual_seed(0)
    save_model(
        build_model("forward_transformation", **kwargs).eval(),
        uri,
        ModelSpec("forward_transformation", "v", kwargs, method="fct"),
    )
    return uri


@ray.remote(num_cpus=0)
class ActorHost:
    """A fresh Ray worker process that builds the backfill's transformation actor inside it."""

    def build(self, model_uri: str, nice_increment: int) -> dict:
        base = os.getpriority(os.PRIO_PROCESS, os.getpid())
        self.actor = TransformEmbeddings(model_uri, nice_increment=nice_increment)
        return {"base": base, "nices": sorted(set(thread_nices().values()))}


@linux_only
def test_the_transformation_actor_runs_every_thread_below_the_worker(ray_cluster, fct_model):
    host = ActorHost.remote()
    try:
        out = ray.get(host.build.remote(fct_model, 2))
    finally:
        ray.kill(host)
    assert out["nices"] == [min(MAX_NICE, out["base"] + 2)]


class NiceProbe:
    """Stands in for an embedding actor in ``_actor_stage``: reports the nice values its threads run at."""

    def __init__(self, num_threads: int = 1, nice_increment: int = 0) -> None:
        self.priority = BackgroundPriority(nice_increment)
        self.base = os.getpriority(os.PRIO_PROCESS, os.getpid())
        self.priority.apply()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.priority.apply()
        nices = thread_nices()
        rows = len(batch["id"])
        return {
            "id": batch["id"],
            "base": np.full(rows, self.base),
            "caller": np.full(rows, nices[threading.get_native_id()]),
            "highest": np.full(rows, min(nices.values())),
            "lowest": np.full(rows, max(nices.values())),
        }


@linux_only
@pytest.mark.parametrize("increment", [0, 3])
def test_the_pool_config_nice_increment_reaches_the_stage_actors(ray_cluster, increment):
    pool = PoolConfig(actors=1, cpus_per_actor=0.25, gpus_per_actor=0.0, batch_size=8, nice_increment=increment)
    ds = ray.data.from_items([{"id": i} for i in range(32)])
    rows = pipeline._actor_stage(ds, NiceProbe, {}, pool, "numpy").take_all()
    assert len(rows) == 32
    for row in rows:
        if increment:  # every thread, Ray's own (which it starts at nice 0) included
            assert int(row["highest"]) == int(row["lowest"]) == min(MAX_NICE, int(row["base"]) + increment)
        else:  # left as Ray started them
            assert int(row["caller"]) == int(row["base"])
