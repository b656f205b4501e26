"""Load: 8 concurrent query clients for 30 s while a backfill job (a separate driver process) moves the
index. Every answer must be whole: k hits, no id twice, no error. Latency percentiles are printed only
(this box is shared, so timings are not asserted)."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest
import test_backfill_run as backfill_run
from test_backfill_run import DIM, N, _address, _out_with_plan, _run_job

from raybackfill.index.router import get

CLIENTS = 8
DURATION_S = 30.0
K = 5
inputs, id_plan, make_index = backfill_run.inputs, backfill_run.id_plan, backfill_run.make_index


@pytest.mark.slow
def test_eight_query_clients_during_an_active_backfill_get_whole_answers(inputs, id_plan, make_index, tmp_path):
    router = make_index("rel-load")
    address = _address()
    stop = threading.Event()
    latencies: list[list[float]] = [[] for _ in range(CLIENTS)]
    errors: list[BaseException] = []

    def client(i: int) -> None:
        rng = np.random.default_rng(100 + i)
        q_old, q_new = (rng.standard_normal((2, DIM)).astype(np.float32) for _ in range(2))
        while not stop.is_set():
            started = time.perf_counter()
            try:
                result = get(router.search.remote(q_old, q_new, K, "rank_merge"), timeout=60)
                latencies[i].append(time.perf_counter() - started)
                for row in result.ids:
                    assert (row >= 0).all() and len(np.unique(row)) == K, f"short or duplicated answer {row}"
                    assert set(row) <= set(range(N)), f"unknown ids in {row}"
            except BaseException as err:  # every failure is a finding
                errors.append(err)

    # The backfill: one job after another (each on a fresh output, the index rolled back in between), so
    # the index is being moved for the whole window; the job running at the end is SIGKILLed.
    jobs, rounds = [], [0]

    def backfill() -> None:
        while not stop.is_set():
            get(router.rollback.remote())
            jobs.append(_run_job(inputs, _out_with_plan(id_plan, tmp_path / f"out-{rounds[0]}"), "rel-load", address))
            while jobs[-1].poll() is None and not stop.is_set():
                time.sleep(0.1)
            rounds[0] += jobs[-1].poll() == 0

    driver = threading.Thread(target=backfill)
    driver.start()
    try:
        deadline = time.monotonic() + 300
        while get(router.progress.remote()).counts["new"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)  # the window starts once the first job moves items
        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        seen_new, window_end = set(), time.monotonic() + DURATION_S
        while time.monotonic() < window_end:
            seen_new.add(get(router.progress.remote()).counts["new"])
            time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(timeout=120)
    finally:
        stop.set()
        for job in jobs:
            if job.poll() is None:
                job.send_signal(signal.SIGKILL)
            job.wait(timeout=30)
        driver.join(timeout=60)

    all_latencies = np.concatenate([np.asarray(x) for x in latencies])
    p50, p99 = np.percentile(all_latencies, [50, 99]) * 1000
    print(
        f"\n{CLIENTS} clients x {DURATION_S:.0f} s: {len(all_latencies)} queries "
        f"({len(all_latencies) / DURATION_S:.1f}/s), p50 {p50:.1f} ms, p99 {p99:.1f} ms; "
        f"{rounds[0]} backfill jobs completed; index 'new' counts seen {sorted(seen_new)}"
    )
    assert not errors, errors[:3]
    assert all(len(x) > 0 for x in latencies)  # every client was served
    assert len(seen_new) > 1  # the index really moved during the window
