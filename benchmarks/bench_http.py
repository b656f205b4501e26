"""The HTTP search service under load, through a backfill and a shard outage, beside direct router calls.

One run, three segments of the same N client threads (single-query requests, k=10, rank_merge):

1. ``idle_http``: HTTP clients against the search service (Ray Serve, loopback, keep-alive connections), no
   backfill;
2. ``idle_direct``: the same clients calling ``router.search`` directly (``ray.get``): the bare config the HTTP
   figures are a ratio of;
3. ``during``: HTTP clients again while a thread upserts new-space vectors in batches (a backfill), and one shard
   is killed a third of the way in (``ray.kill(no_restart=False)``: Ray restarts it from its snapshot); the
   backfill retries its batch while the shard is down and replays what it wrote since the snapshot once the
   shard is back, as the real backfill replays its ledger.

Every answer is checked, not just counted. The new vectors are the old ones turned by a fixed rotation, and each
query is a gallery item's (old, new) vector pair, so under rank_merge an item scores the same in either space:
the exact top-k of a query never changes while items move, and a brute-force numpy top-k is the expected
answer at every instant. An answer is wrong unless it has k distinct ids whose scores are the expected scores
(ties within 1e-4 may swap ids); short means fewer than k hits. Errors are sorted into typed 503s (with their
``Retry-After``) and anything else, and each is placed inside or outside the outage window (kill -> the
restarted shard's first answer, plus ``--grace-s``).

Writes JSON (default benchmarks/results/bench_http.json) and prints a summary. Uses a Ray that is already
initialised (or RAY_ADDRESS), otherwise starts a local one.

    PYTHONPATH=. python benchmarks/bench_http.py --duration 30 --clients 8
    PYTHONPATH=. python benchmarks/bench_http.py --duration 3 --n 2000   # seconds, to see it work
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError

from raybackfill import NAMESPACE
from raybackfill.index.router import IndexUnavailableError, RouterConfig, create_index, destroy_index, get
from raybackfill.runtime import init_ray
from raybackfill.types import Space, Strategy

INDEX = "bench-http"
APP = "bench-http"
K = 10
STRATEGY = Strategy.RANK_MERGE
SCORE_TOL = 1e-4


# --------------------------------------------------------------------------- data with a known answer
@dataclass
class Workload:
    """Gallery (old vectors, their rotations as new vectors), query pairs and the expected top-k of each."""

    ids: np.ndarray
    old: np.ndarray
    new: np.ndarray
    queries: np.ndarray  # positions of the items whose vector pairs are the queries
    expected_scores: np.ndarray  # (nq, k) cosine scores, best first
    score_of: dict[int, np.ndarray] = field(repr=False, default_factory=dict)  # query -> every item's score

    @classmethod
    def make(cls, n: int, d: int, n_queries: int, seed: int = 0) -> Workload:
        rng = np.random.default_rng(seed)
        old = rng.standard_normal((n, d)).astype(np.float32)
        old /= np.linalg.norm(old, axis=1, keepdims=True)
        rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
        new = (old @ rotation).astype(np.float32)
        ids = np.arange(n, dtype=np.int64) * 7 + 100
        queries = rng.choice(n, size=n_queries, replace=False)
        scores = old[queries].astype(np.float64) @ old.T.astype(np.float64)
        top = -np.sort(-scores, axis=1)[:, :K]
        return cls(ids, old, new, queries, top, {q: scores[j] for j, q in enumerate(queries.tolist())})

    def check(self, j: int, hit_ids: list[int], hit_scores: list[float]) -> str:
        """The verdict ("ok", "short" or "wrong") on the answer to query ``j`` (its position in ``queries``)."""
        if len(hit_ids) < K:
            return "short"
        if len(set(hit_ids)) != K or not np.allclose(hit_scores, self.expected_scores[j], atol=SCORE_TOL):
            return "wrong"
        positions = (np.asarray(hit_ids) - 100) // 7
        true = self.score_of[int(self.queries[j])][positions]
        return "ok" if np.allclose(true, hit_scores, atol=SCORE_TOL) else "wrong"


# --------------------------------------------------------------------------- clients
@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # seconds of answered requests
    outcomes: dict[str, int] = field(default_factory=dict)
    errors: list[tuple[float, str]] = field(default_factory=list)  # (time, kind)
    retry_after_missing: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, outcome: str, seconds: float | None = None, at: float | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            if seconds is not None:
                self.latencies.append(seconds)
            if at is not None:
                self.errors.append((at, outcome))


def http_client(port: int, work: Workload, tally: Tally, stop: threading.Event, seed: int) -> None:
    """One user: single-query requests over one keep-alive connection, each answer checked."""
    rng = np.random.default_rng(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while not stop.is_set():
        j = int(rng.integers(len(work.queries)))
        q = int(work.queries[j])
        body = json.dumps(
            {"vectors": {"old": work.old[q].tolist(), "new": work.new[q].tolist()}, "k": K, "strategy": STRATEGY}
        )
        started = time.perf_counter()
        try:
            conn.request("POST", "/search", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = json.loads(response.read())
        except (OSError, http.client.HTTPException, json.JSONDecodeError):
            tally.add("connection_error", at=time.monotonic())
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            continue
        seconds = time.perf_counter() - started
        if response.status == 200:
            hits = payload["results"][0]
            tally.add(work.check(j, [h["id"] for h in hits], [h["score"] for h in hits]), seconds)
        elif response.status == 503 and payload.get("error", {}).get("type") == "index_unavailable":
            if not response.getheader("Retry-After"):
                tally.retry_after_missing += 1
            tally.add("typed_503", at=time.monotonic())
        else:
            tally.add(f"http_{response.status}", at=time.monotonic())
    conn.close()


def direct_client(router, work: Workload, tally: Tally, stop: threading.Event, seed: int) -> None:
    """The same user calling the router directly (the bare configuration)."""
    rng = np.random.default_rng(seed)
    while not stop.is_set():
        j = int(rng.integers(len(work.queries)))
        q = int(work.queries[j])
        started = time.perf_counter()
        try:
            top = get(router.search.remote(work.old[q : q + 1], work.new[q : q + 1], K, STRATEGY))
        except IndexUnavailableError:
            tally.add("typed_503", at=time.monotonic())
            continue
        seconds = time.perf_counter() - started
        hit = top.ids[0] >= 0
        tally.add(work.check(j, top.ids[0][hit].tolist(), top.scores[0][hit].tolist()), seconds)


def run_clients(target, n: int, seconds: float, work: Workload, tally: Tally, during=None) -> float:
    """``n`` client threads for ``seconds`` (``during(elapsed_fraction)`` is polled meanwhile); wall seconds."""
    stop = threading.Event()
    run = http_client if isinstance(target, int) else direct_client
    threads = [threading.Thread(target=run, args=(target, work, tally, stop, i), daemon=True) for i in range(n)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    while (elapsed := time.perf_counter() - started) < seconds:
        if during is not None:
            during(elapsed / seconds)
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def summary_of(tally: Tally, wall: float) -> dict[str, Any]:
    answered = len(tally.latencies)
    ms = np.asarray(tally.latencies) * 1000.0 if answered else np.zeros(1)
    return {
        "answers": answered,
        "qps": answered / wall if wall > 0 else 0.0,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "outcomes": dict(sorted(tally.outcomes.items())),
        "wrong": tally.outcomes.get("wrong", 0),
        "short": tally.outcomes.get("short", 0),
    }


# --------------------------------------------------------------------------- backfill and outage
class Backfill:
    """Moves items to the new space in batches; retries a batch while a shard is down; replays its log on demand."""

    def __init__(self, router, work: Workload, batch: int, rate: float) -> None:
        self.router, self.work, self.batch, self.rate = router, work, batch, rate
        self.done: list[tuple[int, int]] = []  # the "ledger": (start, stop) of every applied batch
        self.retries = self.replayed = 0
        self.replay = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bench-backfill", daemon=True)

    def _upsert(self, lo: int, hi: int) -> None:
        while not self.stop.is_set():
            try:
                get(self.router.upsert.remote(self.work.ids[lo:hi], self.work.new[lo:hi], Space.NEW, "v2"))
                return
            except IndexUnavailableError:
                self.retries += 1
                time.sleep(0.2)

    def _run(self) -> None:
        n = len(self.work.ids)
        for lo in range(0, n, self.batch):
            if self.stop.is_set():
                return
            if self.replay.is_set():
                self.replay.clear()
                for a, b in list(self.done):
                    self._upsert(a, b)
                    self.replayed += 1
            started = time.perf_counter()
            hi = min(n, lo + self.batch)
            self._upsert(lo, hi)
            self.done.append((lo, hi))
            time.sleep(max(0.0, (hi - lo) / self.rate - (time.perf_counter() - started)))

    @property
    def moved(self) -> int:
        return sum(b - a for a, b in self.done)


def kill_and_wait(shard, timeout: float = 120.0) -> float:
    """Kill the shard (Ray restarts it); returns when a new process answers. Seconds it was down."""
    pid = ray.get(shard.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)
    started = time.monotonic()
    ray.kill(shard, no_restart=False)
    while time.monotonic() - started < timeout:
        try:
            if ray.get(shard.__ray_call__.remote(lambda _self: os.getpid()), timeout=5) != pid:
                return time.monotonic() - started
        except (RayActorError, GetTimeoutError):
            pass
        time.sleep(0.1)
    raise TimeoutError("the killed shard did not restart")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(attempts: int = 3) -> int:
    """Start Serve's proxy on a free loopback port; another process can take the port before the proxy binds
    it (a shared machine), so a failed bind tries another one. Returns the port. A proxy already running on
    this cluster keeps its port (Serve fixes it at start): that one is returned."""
    from ray import serve

    from raybackfill.service.app import running_proxy

    running = running_proxy()
    if running is not None:
        return running[1]
    for attempt in range(attempts):
        port = _free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            return port
        except Exception:  # noqa: BLE001 - Ray wraps the bind error; the last attempt re-raises it
            serve.shutdown()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds under backfill (default 30)")
    parser.add_argument("--idle", type=float, help="seconds of each idle segment (default duration / 2)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--n", type=int, default=20_000, help="gallery items (default 20000)")
    parser.add_argument("--d", type=int, default=64, help="dimension (default 64)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--queries", type=int, default=200, help="distinct query items (default 200)")
    parser.add_argument("--batch", type=int, default=500, help="items per backfill upsert (default 500)")
    parser.add_argument("--grace-s", type=float, default=2.0, help="after the restart, still the outage (default 2)")
    parser.add_argument("--replica-cpus", type=float, default=0.5)
    parser.add_argument("--out", default="benchmarks/results/bench_http.json")
    args = parser.parse_args(argv)
    from ray import serve

    from raybackfill.service.app import build_app

    init_ray()
    work = Workload.make(args.n, args.d, args.queries)
    idle_s = args.idle if args.idle is not None else args.duration / 2
    load_before = os.getloadavg()
    from raybackfill.service.app import running_proxy

    owns_serve = running_proxy() is None
    with tempfile.TemporaryDirectory(prefix="bench-http-") as snapshots:
        router = create_index(RouterConfig(name=INDEX, shards=args.shards, snapshot_uri=snapshots))
        try:
            get(router.load_old.remote(work.ids, work.old, "v1"))
            get(router.snapshot.remote())
            port = start_serve()
            app = build_app({"index": INDEX, "min_replicas": 1, "max_replicas": 1, "num_cpus": args.replica_cpus})
            serve.run(app, name=APP, route_prefix="/")
            # Warm both paths (connections, replica, caches) before anything is measured.
            run_clients(port, 2, min(1.0, idle_s), work, Tally())
            run_clients(router, 2, min(1.0, idle_s), work, Tally())

            idle_http, idle_direct, during = Tally(), Tally(), Tally()
            wall_http = run_clients(port, args.clients, idle_s, work, idle_http)
            wall_direct = run_clients(router, args.clients, idle_s, work, idle_direct)

            get(router.set_phase.remote("backfill"))
            rate = args.n / max(args.duration, 1e-6) * 0.8  # most of the gallery moves during the segment
            backfill = Backfill(router, work, args.batch, rate)
            outage: dict[str, float] = {}
            shard = ray.get_actor(f"{INDEX}-shard-000", namespace=NAMESPACE)
            killer = threading.Thread(target=lambda: outage.update(down_s=kill_and_wait(shard)), daemon=True)

            def at(fraction: float) -> None:
                if fraction >= 1 / 3 and "killed_at" not in outage:
                    outage["killed_at"] = time.monotonic()
                    killer.start()
                if "down_s" in outage and "restarted_at" not in outage:
                    outage["restarted_at"] = outage["killed_at"] + outage["down_s"]
                    backfill.replay.set()

            started_at = time.monotonic()
            backfill.thread.start()
            wall_during = run_clients(port, args.clients, args.duration, work, during, during=at)
            backfill.stop.set()
            backfill.thread.join()
            killer.join(timeout=120)
            if "restarted_at" not in outage and "down_s" in outage:
                outage["restarted_at"] = outage["killed_at"] + outage["down_s"]
        finally:
            serve.delete(APP)
            if owns_serve:  # leave no proxy behind on a port the next user of this cluster did not choose
                serve.shutdown()
            destroy_index(INDEX)

    window = (outage.get("killed_at", 0.0), outage.get("restarted_at", float("inf")) + args.grace_s)
    outside = [kind for t, kind in during.errors if not window[0] <= t <= window[1]]
    inside = [kind for t, kind in during.errors if window[0] <= t <= window[1]]
    result = {
        "benchmark": "http_service_under_backfill_and_shard_outage",
        "config": {
            "clients": args.clients,
            "duration_s": args.duration,
            "idle_s": idle_s,
            "n": args.n,
            "d": args.d,
            "shards": args.shards,
            "k": K,
            "strategy": STRATEGY.value,
            "backfill_batch": args.batch,
            "replica_cpus": args.replica_cpus,
            "cores": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "idle_http": summary_of(idle_http, wall_http),
        "idle_direct": summary_of(idle_direct, wall_direct),
        "during_backfill_http": summary_of(during, wall_during),
        "outage": {
            "shard_down_s": outage.get("down_s"),
            "killed_after_s": outage["killed_at"] - started_at if "killed_at" in outage else None,
            "typed_503_inside_window": inside.count("typed_503"),
            "other_errors_inside_window": len(inside) - inside.count("typed_503"),
            "errors_outside_window": len(outside),
            "retry_after_missing": during.retry_after_missing,
            "backfill_retries": backfill.retries,
            "backfill_batches_replayed": backfill.replayed,
        },
        "backfill": {"items_moved": backfill.moved, "of": args.n},
        "ratios": {},
    }
    idle, direct, live = result["idle_http"], result["idle_direct"], result["during_backfill_http"]
    result["ratios"] = {
        "http_qps_vs_direct": idle["qps"] / direct["qps"] if direct["qps"] else None,
        "http_p50_vs_direct": idle["p50_ms"] / direct["p50_ms"] if direct["p50_ms"] else None,
        "p99_during_vs_idle_http": live["p99_ms"] / idle["p99_ms"] if idle["p99_ms"] else None,
    }
    result["wrong_or_short"] = sum(s["wrong"] + s["short"] for s in (idle, direct, live))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(summary(result))
    return result


def summary(r: dict) -> str:
    idle, direct, live, out = r["idle_http"], r["idle_direct"], r["during_backfill_http"], r["outage"]
    return "\n".join(
        [
            f"HTTP idle:   {idle['qps']:8.1f} QPS  p50 {idle['p50_ms']:6.1f} ms  p99 {idle['p99_ms']:6.1f} ms",
            f"direct idle: {direct['qps']:8.1f} QPS  p50 {direct['p50_ms']:6.1f} ms  p99 {direct['p99_ms']:6.1f} ms",
            f"HTTP during: {live['qps']:8.1f} QPS  p50 {live['p50_ms']:6.1f} ms  p99 {live['p99_ms']:6.1f} ms",
            f"HTTP/direct QPS {r['ratios']['http_qps_vs_direct']:.2f}; p99 during/idle "
            f"{r['ratios']['p99_during_vs_idle_http']:.2f}",
            f"wrong or short answers: {r['wrong_or_short']}; shard down {out['shard_down_s'] or 0:.1f} s: "
            f"{out['typed_503_inside_window']} typed 503s, {out['other_errors_inside_window']} other errors inside, "
            f"{out['errors_outside_window']} errors outside the outage; backfill moved {r['backfill']['items_moved']}",
        ]
    )


if __name__ == "__main__":
    main()
