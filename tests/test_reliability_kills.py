"""Fault injection: the backfill driver SIGKILLed at seeded random points, and an index shard killed in
the middle of a backfill. In the end every id is in the outputs and the index exactly once; during the
shard's outage a query is complete or a typed IndexUnavailableError, never a silently short answer."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import test_backfill_run as backfill_run
from index_testing import kill_and_wait_for_restart
from test_backfill_run import CORRUPT_ID, DIM, N, _address, _out_with_plan, _run_job

from raybackfill import NAMESPACE
from raybackfill.backfill.ledger import Ledger
from raybackfill.backfill.run import BackfillConfig, run_backfill
from raybackfill.cli.main import main
from raybackfill.data.schema import ID
from raybackfill.data.storage import read_table
from raybackfill.embed.pipeline import PoolConfig
from raybackfill.index.router import IndexUnavailableError, RouterConfig, create_index, destroy_index, get
from raybackfill.types import Space

OLD, NEW = Space.OLD.code, Space.NEW.code

KILL_SEED = 2  # one kill while the job starts, two just after a committed batch
# The backfill tests' fixtures (16 tiny images, one corrupt; a 2-tier plan; an index per test), shared.
inputs, id_plan, make_index = backfill_run.inputs, backfill_run.id_plan, backfill_run.make_index


def _assert_every_good_id_once_in_the_new_space(router, ledger: Ledger) -> None:
    """Outputs: every id but the corrupt image once; index: those ids new, the quarantined one still old."""
    new_ids = ledger.ids(ledger.new_uri)
    assert len(new_ids) == len(np.unique(new_ids)) and set(new_ids) == set(range(N)) - {CORRUPT_ID}
    for path in ledger.files(ledger.new_uri):  # every committed file is whole and readable
        assert pq.read_table(path).num_rows > 0
    quarantine = read_table(ledger.quarantine_uri)
    assert CORRUPT_ID in quarantine.column(ID).to_pylist()
    states = get(router.vectors.remote(np.arange(N))).states
    assert (states[np.arange(N) != CORRUPT_ID] == NEW).all() and states[CORRUPT_ID] == OLD
    assert get(router.progress.remote()).counts == {"old": 1, "transformed": 0, "new": N - 1}
    q = np.random.default_rng(0).standard_normal((2, DIM)).astype(np.float32)
    result = get(router.search.remote(q, q, N, "rank_merge"))
    for row in result.ids:  # the index answers with every item exactly once
        np.testing.assert_array_equal(np.sort(row), np.arange(N))


@pytest.mark.slow
def test_a_driver_sigkilled_at_three_seeded_points_and_rerun_ends_with_every_id_once(
    inputs, id_plan, make_index, tmp_path
):
    router = make_index("rel-sigkill")
    out = _out_with_plan(id_plan, tmp_path / "out")
    ledger = Ledger(out)
    rng = np.random.default_rng(KILL_SEED)
    address = _address()
    # Three seeded kill points: while the job starts (imports, attach, ledger replay), or just after it
    # committed a batch (between a write and its upsert, or inside the next decode/embed).
    points = [("start", float(rng.uniform(0.5, 3.0))) if rng.random() < 0.5 else ("write", float(rng.uniform(0, 0.05)))
              for _ in range(3)]  # fmt: skip
    print(f"kill points: {points}")
    for attempt, (stage, delay) in enumerate(points):
        before = len(ledger.files(ledger.new_uri))
        job = _run_job(inputs, out, "rel-sigkill", address)
        try:
            deadline = time.monotonic() + 300
            while (
                stage == "write"
                and len(ledger.files(ledger.new_uri)) == before
                and job.poll() is None
                and time.monotonic() < deadline
            ):
                time.sleep(0.01)
            time.sleep(delay)
            assert job.poll() is None, f"attempt {attempt} ended before its kill: {job.stdout.read().decode()[-3000:]}"
            job.send_signal(signal.SIGKILL)
        finally:
            job.wait(timeout=30)
        written = ledger.ids(ledger.new_uri)
        assert len(written) == len(np.unique(written)), f"attempt {attempt} duplicated an id"
    assert len(ledger.ids(ledger.new_uri)) < N - 1  # the kills left work for the last run

    final = _run_job(inputs, out, "rel-sigkill", address)
    output = final.communicate(timeout=300)[0].decode()
    assert final.returncode == 0, output[-3000:]
    assert "backfill complete" in output
    _assert_every_good_id_once_in_the_new_space(router, ledger)


@pytest.fixture
def snapshotted_index(inputs, ray_cluster, tmp_path):
    """An index whose shards snapshot to disk, snapshotted right after the gallery was loaded."""
    name = "rel-shard-kill"
    router = create_index(
        RouterConfig(name=name, shards=2, shard_num_cpus=0.1, snapshot_uri=str(tmp_path / "snapshots"))
    )
    get(router.load_old.remote(np.arange(N), inputs["old_vectors"], "old-v1"))
    get(router.snapshot.remote())
    yield router
    destroy_index(name)


@pytest.mark.slow
def test_a_shard_killed_mid_backfill_restarts_from_its_snapshot_and_the_ledger_and_queries_never_fall_short(
    inputs, id_plan, snapshotted_index, tmp_path
):
    router = snapshotted_index
    out = _out_with_plan(id_plan, tmp_path / "out")
    ledger = Ledger(out)
    config = BackfillConfig(
        gallery=inputs["gallery"], old_embeddings=inputs["old"], upgrade=inputs["new"], out=out, method="bct",
        policy="id", tiers=2, max_bad_fraction=0.5, index="rel-shard-kill", pool=PoolConfig(batch_size=2),
        progress=False,
    )  # fmt: skip
    stop, outcomes, errors = threading.Event(), {"complete": 0, "unavailable": 0}, []
    q = np.random.default_rng(1).standard_normal((3, DIM)).astype(np.float32)

    def query() -> None:
        while not stop.is_set():
            try:
                result = get(router.search.remote(q, q, N, "rank_merge"), timeout=60)
                for row in result.ids:  # complete: every item once (a restored shard may serve older vectors)
                    np.testing.assert_array_equal(np.sort(row), np.arange(N))
                outcomes["complete"] += 1
            except IndexUnavailableError as err:
                assert "unavailable" in str(err)
                outcomes["unavailable"] += 1
            except Exception as err:  # anything else (an untyped error, a short answer) is a finding
                errors.append(err)
            time.sleep(0.01)

    ended: dict = {}

    def backfill() -> None:
        try:
            ended["summary"] = run_backfill(config)
        except Exception as err:  # reported by the assertion below
            ended["error"] = err

    job = threading.Thread(target=backfill)
    client = threading.Thread(target=query)
    client.start()
    job.start()
    try:
        # Kill shard 0 once it holds moved items that its snapshot (taken before the backfill) lacks.
        deadline = time.monotonic() + 300
        while get(router.progress.remote()).per_shard[0]["new"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.is_alive(), "the backfill ended before the shard was killed"
        kill_and_wait_for_restart(ray.get_actor("rel-shard-kill-shard-000", namespace=NAMESPACE))
        job.join(timeout=300)
    finally:
        stop.set()
        client.join()
        job.join(timeout=300)
    print(f"\nqueries during the shard kill: {outcomes}")
    assert not errors, errors[:3]
    assert outcomes["complete"] > 0
    assert "error" not in ended, ended.get("error")
    summary = ended["summary"]
    print(f"rows replayed: {summary.replayed} in all, by phase {[(p.name, p.replayed) for p in summary.phases]}")
    assert summary.complete and summary.replayed > 0  # the restarted shard got its moved items back
    _assert_every_good_id_once_in_the_new_space(router, ledger)


def test_a_dead_shard_fails_queries_and_upserts_with_a_typed_error_not_a_short_answer(inputs, make_index, capsys):
    router = make_index("rel-dead-shard")
    ray.kill(ray.get_actor("rel-dead-shard-shard-001", namespace=NAMESPACE), no_restart=True)
    q = np.ones((1, DIM), np.float32)
    for call in (
        router.search.remote(q, None, 5, "old"),
        router.progress.remote(),
        router.upsert.remote(np.arange(4), np.ones((4, DIM), np.float32), "new", "new-v2"),
    ):
        with pytest.raises(IndexUnavailableError, match="an index shard unavailable"):
            get(call, timeout=60)
    # The CLI reports it as an error line (exit 2), not a traceback.
    assert main(["status", "--name", "rel-dead-shard"]) == 2
    assert "raybackfill status: error: an index shard unavailable" in capsys.readouterr().err
