"""Merged-query throughput of the sharded index vs a bare FAISS IndexFlatIP, side by side in one process.

The baseline is the best bare configuration with at most the same total threads: one IndexFlatIP over
the whole gallery in this process, searching the same query batch with ``--cpus`` FAISS threads and with
one thread (OpenMP barriers suffer on a busy machine), whichever is faster. The index runs
``--shards`` shard actors with ``--cpus / --shards`` CPUs each (so the same total threads) behind the
router, with a fraction ``--beta`` of the gallery backfilled into the new space. Each measurement is the
best of ``--repeats`` runs, taken while the other side is idle.

Then the latency a user sees: ``--latency-probes`` single queries (k=10, rank_merge, one query per call,
sequential) against the router while it is idle, and the same queries again while a background thread
upserts new-space vectors in batches of 10k like a backfill (first the items still in the old space,
then, if those run out, re-upserting moved ones). A shard runs one search or upsert at a time, so a
query that arrives during an upsert waits for it, and on a small box the upserts also take CPU from the
queries. The thread upserts as fast as the shards take it (a stress test: faster than an instant phase
produces on the same box), then again paced at ``--paced-rate`` items/s (default 20k, the backfill rate the
issue asks of the transform path) for the latency of a backfill running at a real pace.

Writes JSON (default benchmarks/results/bench_index.json) with the machine (cores, FAISS/numpy/BLAS
versions, load average at start and end: the box may be shared) and prints a summary. Uses a Ray that
is already initialised (or RAY_ADDRESS) and otherwise starts a local one with ``--cpus`` CPUs.

    PYTHONPATH=. python benchmarks/bench_index.py --n 1000000 --d 128 --queries 1000 --k 10
    PYTHONPATH=. python benchmarks/bench_index.py --quick   # 50k vectors, well under a minute

``kinds`` (``python benchmarks/bench_index.py kinds``, :func:`kinds_main`) compares, for each FAISS factory string
of ``--factories`` (default: Flat, IVF1024,Flat, IVF1024,SQ8, IVF1024,PQ32, OPQ16,IVF1024,PQ16, HNSW32), the
router's merged query with a bare FAISS index of the same factory string, build and search parameters, side by side
in one run, over a clustered synthetic gallery (default 1M x 128): recall@10 against exact search, QPS, bytes
per item (serialised size / n) and their ratios. The router serves with each shard count of ``--shards``
(default 1 and 2, each shard with ``--cpus / shards`` CPUs: on one box, one shard with every core is one process
searching two parts, two shards are two processes searching four); the best ratio (each against the bare index
timed in its own rounds) is the headline, as the bare side's fastest thread count is its own. Both sides train
on the same sample. The router holds the gallery with a fraction ``--beta`` moved to the new space *with the
same vectors* (so exact search over the
gallery is the ground truth of both sides) and answers ``rank_merge`` queries, which search the pending old
vectors and the new space of every shard and merge them. A third side, ``bare_parts``, is bare FAISS over the
same parts (one index per shard and space, searched one after the other in this process, merged with numpy):
``split_qps_ratio`` (bare parts / bare) is what splitting the gallery costs FAISS itself, ``serving_qps_ratio``
(index / bare parts) what the serving system adds; their product is ``qps_ratio``. Before the moves, while
every item is old, the index also answers the same queries on the old space alone (one FAISS search per shard,
merged across the shards): ``one_space_qps_ratio`` (that / bare) is the serving cost without the split. After the
``rank_merge`` rounds, the items still old are transformed into the new space (same vectors) and a fraction
``--beta`` of those re-embedded in place, as in a transform-path backfill (FCT, FastFill) under way: every item is
in the new space, some rows were replaced (a graph index keeps them as deleted rows, filtered at search, until its
rebuild), and a ``compatible`` query searches one space per shard. ``transform_qps_ratio`` is that against the
bare index. A graph kind cannot remove a row, so a fourth side, ``transform_bare_replaced``, is bare FAISS after the
same replacements (the same adds in the same order, the replaced rows excluded by an IDSelector):
``transform_replaced_qps_ratio`` (that / bare) is what the replaced rows cost FAISS itself,
``transform_serving_qps_ratio`` (index / that) what serving adds.

The index side searches through an ``IndexSearcher`` (the driver calls the shards, as the HTTP service does);
``router_qps_ratio`` and ``router_one_space_qps_ratio`` are the same searches through the router, one Ray hop
more. Both paths must return the same answer.

Every side is timed in ``--repeats`` interleaved rounds (each round runs the bare index at each thread count,
the bare parts, the searcher and the router once, in an order rotated between rounds) and keeps its best run:
a slow spell of a shared machine falls on every side instead of on whichever ran then, and each ratio divides
by the bare index timed in the same rounds. Each timed search follows an untimed search of the same side, so
both sides are timed warm, as an index answering queries back to back is; timed cold, the order decided (the bare
index at 2 threads ran right after itself at 1 thread, warm, and the searcher right after it, on its caches).
``*_qps_ratio_rounds`` hold the same ratios paired within each round (sorted), the spread against which a
difference between two figures is read.

    PYTHONPATH=. python benchmarks/bench_index.py kinds --n 1000000   # the issue's size
    PYTHONPATH=. python benchmarks/bench_index.py kinds --n 20000 --factories "Flat;IVF1024,SQ8;HNSW32"
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import ray

from raybackfill import NAMESPACE
from raybackfill.index.kinds import build, default_build_params, default_params, layout_of, search_parameters
from raybackfill.index.router import IndexSearcher, RouterConfig, create_index, destroy_index, get
from raybackfill.index.shard import IndexConfig
from raybackfill.index.sharding import shard_of
from raybackfill.runtime import init_ray
from raybackfill.types import Layout, Metric, Space, Strategy

CHUNK = 10_000  # rows per load_old / upsert call, like a backfill batch
# the transform-path figures of a graph kind against the bare index with the same replaced rows
REPLACED_PREFIXES = ("transform_bare_replaced", "transform_replaced_", "transform_serving_")
QUICK = {"n": 50_000, "queries": 200, "latency_probes": 100}
LATENCY_K, LATENCY_STRATEGY = 10, Strategy.RANK_MERGE
WARMUP_PROBES = 3  # single queries before the idle measurement, not recorded
BACKFILL_TARGET_ITEMS_PER_S = 20_000  # the rate for the transform path: the pace of the paced upserts


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def best_of(repeats: int, fn) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def bare_flat_ip(gallery: np.ndarray, queries: np.ndarray, k: int, threads: int, repeats: int):
    """The baseline: one IndexFlatIP in this process; returns (add seconds, best search seconds, ids)."""
    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatIP(gallery.shape[1])
    add_s, _ = best_of(1, lambda: index.add(gallery))
    search_s, (_, ids) = best_of(repeats, lambda: index.search(queries, k))
    return add_s, search_s, ids


def loaded_blas_libraries() -> list[str] | None:
    """BLAS/OpenMP/MKL libraries mapped into this process (Linux): FAISS's wheel brings its own OpenBLAS,
    which is not the one numpy reports. None where /proc is absent."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return None
    names = {Path(line.split()[-1]).name for line in maps.read_text().splitlines() if ".so" in line}
    return sorted(name for name in names if re.search(r"blas|mkl|^lib[gi]?omp", name))


def machine_info() -> dict:
    """What the numbers depend on: cores, library builds, BLAS (as numpy, the loaded libraries and
    threadpoolctl, if installed, see it)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        threadpool_info = None
    blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "faiss": faiss.__version__,
        "faiss_compile_options": faiss.get_compile_options(),
        "numpy": np.__version__,
        "numpy_blas": {key: blas.get(key) for key in ("name", "version", "openblas configuration")},
        "blas_libraries_loaded": loaded_blas_libraries(),
        "threadpools": threadpool_info() if threadpool_info else None,
        "ray": ray.__version__,
    }


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    p50, p99 = np.percentile(np.asarray(seconds) * 1000.0, [50, 99])
    return {"p50_ms": float(p50), "p99_ms": float(p99)}


def probe_latency(router, q_old: np.ndarray, q_new: np.ndarray) -> list[float]:
    """Seconds of each single-query search, one call at a time (as one user's requests arrive)."""
    seconds = []
    for i in range(len(q_old)):
        start = time.perf_counter()
        get(router.search.remote(q_old[i : i + 1], q_new[i : i + 1], LATENCY_K, LATENCY_STRATEGY))
        seconds.append(time.perf_counter() - start)
    return seconds


def probe_during_upserts(
    router,
    q_old: np.ndarray,
    q_new: np.ndarray,
    batches: list[np.ndarray],
    d: int,
    seed: int,
    rate: float | None = None,
) -> tuple[list[float], dict]:
    """Probe latency while a thread upserts ``batches`` (cycling) of fresh new-space vectors until the probes
    end, at most ``rate`` items/s (None: as fast as they are taken); returns the probe seconds and what the
    upsert thread achieved."""
    stop, first_sent = threading.Event(), threading.Event()
    done: dict[str, Any] = {"items": 0, "calls": 0, "seconds": 0.0, "error": None}

    def upsert_loop() -> None:
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        try:
            for batch in itertools.cycle(batches):
                if stop.is_set():
                    break
                ref = router.upsert.remote(batch, unit_rows(rng, len(batch), d), Space.NEW, "v2")
                first_sent.set()
                get(ref)
                done["items"] += len(batch)
                done["calls"] += 1
                if rate:  # sleep off any lead over the pace (stop.wait returns early when the probes end)
                    stop.wait(max(done["items"] / rate - (time.perf_counter() - start), 0.0))
        except Exception as err:  # handed to the main thread below
            done["error"] = err
        finally:
            first_sent.set()
            done["seconds"] = time.perf_counter() - start

    thread = threading.Thread(target=upsert_loop, name="bench-upserts", daemon=True)
    thread.start()
    first_sent.wait()
    try:
        seconds = probe_latency(router, q_old, q_new)
    finally:
        stop.set()
        thread.join()
    if done["error"] is not None:
        raise done["error"]
    return seconds, done


def main(argv: list[str] | None = None) -> dict:
    load_start = os.getloadavg()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="gallery size (default 1M)")
    parser.add_argument("--d", type=int, default=128, help="dim (default 128)")
    parser.add_argument("--queries", type=int, default=1000, help="queries per search call (default 1000)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="total threads, both sides")
    parser.add_argument("--beta", type=float, default=0.5, help="backfilled fraction for merged queries")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--latency-probes",
        type=int,
        default=1000,
        help="single queries per latency measurement, idle and during upserts (default 1000)",
    )
    parser.add_argument(
        "--paced-rate",
        type=float,
        default=float(BACKFILL_TARGET_ITEMS_PER_S),
        help="items/s of the paced upserts during the second latency measurement (default 20k)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/bench_index.json")
    parser.add_argument(
        "--quick", action="store_true", help=f"small run for a smoke test: defaults {QUICK} (explicit flags still win)"
    )
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    if args.latency_probes < 1 or args.paced_rate <= 0:
        parser.error("--latency-probes and --paced-rate must be positive")

    rng = np.random.default_rng(args.seed)
    ids = np.arange(args.n, dtype=np.int64)
    old = unit_rows(rng, args.n, args.d)
    queries = unit_rows(rng, args.queries, args.d)

    bare = {t: bare_flat_ip(old, queries, args.k, t, args.repeats) for t in sorted({args.cpus, 1})}
    best_threads = min(bare, key=lambda t: bare[t][1])
    add_s, bare_s, bare_ids = bare[best_threads]

    owns_ray = not ray.is_initialized()
    init_ray(num_cpus=args.cpus)
    config = RouterConfig(name="bench-index", shards=args.shards, shard_num_cpus=args.cpus / args.shards)
    router = create_index(config)
    try:
        start = time.perf_counter()
        for lo in range(0, args.n, CHUNK):
            get(router.load_old.remote(ids[lo : lo + CHUNK], old[lo : lo + CHUNK], "v1"))
        load_s = time.perf_counter() - start

        old_s, old_result = best_of(
            args.repeats, lambda: get(router.search.remote(queries, None, args.k, Strategy.OLD))
        )
        same_as_bare = float(np.mean(old_result.ids == bare_ids))

        order = rng.permutation(args.n)
        moved, still_old = order[: int(args.beta * args.n)], order[int(args.beta * args.n) :]
        new = unit_rows(rng, len(moved), args.d)
        start = time.perf_counter()
        for lo in range(0, len(moved), CHUNK):
            get(router.upsert.remote(ids[moved[lo : lo + CHUNK]], new[lo : lo + CHUNK], Space.NEW, "v2"))
        upsert_s = time.perf_counter() - start

        strategies = {}
        for strategy in Strategy:

            def search(s=strategy):
                return get(router.search.remote(queries, queries, args.k, s))

            seconds, _ = best_of(args.repeats, search)
            strategies[strategy] = {
                "seconds": seconds,
                "qps": args.queries / seconds,
                "ratio_to_bare": (args.queries / seconds) / (args.queries / bare_s),
            }

        probes_old = unit_rows(rng, args.latency_probes, args.d)
        probes_new = unit_rows(rng, args.latency_probes, args.d)
        probe_latency(router, probes_old[:WARMUP_PROBES], probes_new[:WARMUP_PROBES])
        idle = probe_latency(router, probes_old, probes_new)
        pool = ids[still_old] if len(still_old) else ids
        batches = [pool[lo : lo + CHUNK] for lo in range(0, len(pool), CHUNK)]
        busy, upserts = probe_during_upserts(router, probes_old, probes_new, batches, args.d, args.seed + 1)
        paced, paced_upserts = probe_during_upserts(
            router, probes_old, probes_new, batches, args.d, args.seed + 2, rate=args.paced_rate
        )
    finally:
        destroy_index(config.name)
        if owns_ray:
            ray.shutdown()

    def during(seconds: list[float], achieved: dict) -> dict:
        return {
            **percentiles_ms(seconds),
            "upserts_per_s": achieved["items"] / achieved["seconds"],
            "upsert_items": achieved["items"],
            "upsert_calls": achieved["calls"],
            "upsert_seconds": achieved["seconds"],
        }

    latency: dict[str, Any] = {
        "what": f"{args.latency_probes} single queries, k={LATENCY_K}, strategy {LATENCY_STRATEGY}, one per call, "
        f"sequential; during_upserts: a thread upserts {CHUNK} new-space vectors per call meanwhile, as "
        f"fast as they are taken; during_paced_upserts: the same at {args.paced_rate:,.0f} items/s",
        "idle": percentiles_ms(idle),
        # upserted items beyond items_still_old_before were re-upserts
        "during_upserts": {**during(busy, upserts), "items_still_old_before": len(still_old)},
        "during_paced_upserts": {**during(paced, paced_upserts), "paced_rate": args.paced_rate},
    }
    latency["p99_ratio"] = latency["during_upserts"]["p99_ms"] / latency["idle"]["p99_ms"]
    latency["p99_ratio_paced"] = latency["during_paced_upserts"]["p99_ms"] / latency["idle"]["p99_ms"]
    load_end = os.getloadavg()

    result: dict[str, Any] = {
        "benchmark": "bench_index",
        "config": vars(args),
        "machine": {**machine_info(), "loadavg_start": load_start, "loadavg_end": load_end},
        "baseline": {
            "what": f"bare faiss.IndexFlatIP, one process, best of {sorted(bare)} threads",
            "threads": best_threads,
            "add_seconds": add_s,
            "search_seconds": bare_s,
            "qps": args.queries / bare_s,
            "qps_by_threads": {t: args.queries / b[1] for t, b in bare.items()},
        },
        "index": {
            "what": f"{args.shards} shard actors x {args.cpus / args.shards:g} CPU behind the router",
            "load_seconds": load_s,
            "load_items_per_s": args.n / load_s,
            "beta0_old_search_seconds": old_s,
            "beta0_old_qps": args.queries / old_s,
            "beta0_old_ids_equal_to_bare": same_as_bare,
            "upsert_items": len(moved),
            "upsert_seconds": upsert_s,
            "upsert_items_per_s": len(moved) / upsert_s if upsert_s else None,
            "strategies_at_beta": strategies,
        },
        "latency": latency,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"bare IndexFlatIP: {args.queries / bare_s:,.0f} QPS ({best_threads} threads)")
    print(f"index at beta=0, strategy old: {args.queries / old_s:,.0f} QPS (ids equal to bare: {same_as_bare:.4f})")
    for name, r in strategies.items():
        print(f"index at beta={args.beta}, {name}: {r['qps']:,.0f} QPS, ratio {r['ratio_to_bare']:.2f}")
    print(f"upsert: {result['index']['upsert_items_per_s'] or 0:,.0f} items/s")
    busy_ms, paced_ms = latency["during_upserts"], latency["during_paced_upserts"]
    print(
        f"single-query {LATENCY_STRATEGY} latency: idle p50 {latency['idle']['p50_ms']:.1f} ms, "
        f"p99 {latency['idle']['p99_ms']:.1f} ms; during upserts ({busy_ms['upserts_per_s']:,.0f} items/s) "
        f"p50 {busy_ms['p50_ms']:.1f} ms, p99 {busy_ms['p99_ms']:.1f} ms (p99 x{latency['p99_ratio']:.2f}); "
        f"paced ({paced_ms['upserts_per_s']:,.0f} items/s) p50 {paced_ms['p50_ms']:.1f} ms, "
        f"p99 {paced_ms['p99_ms']:.1f} ms "
        f"(p99 x{latency['p99_ratio_paced']:.2f})"
    )
    print(f"load average {load_start[0]:.1f} -> {load_end[0]:.1f} on {os.cpu_count()} cores; wrote {out}")
    return result


# ------------------------------------------------------------------------- index kinds
KIND_FACTORIES = ("Flat", "IVF1024,Flat", "IVF1024,SQ8", "IVF1024,PQ32", "OPQ16,IVF1024,PQ16", "HNSW32")
# A quick run keeps the six layouts but with codebooks that train in seconds (256 lists, 4-bit PQ): 8-bit PQ32
# codebooks alone take minutes to train on a busy 2-core box.
KINDS_QUICK = {
    "n": 20_000,
    "queries": 200,
    "train_size": 20_000,
    "factories": "Flat;IVF256,Flat;IVF256,SQ8;IVF256,PQ32x4;OPQ16,IVF256,PQ16x4;HNSW32",
}
KINDS_INDEX = "bench-kinds"
RECALL_K = 10


def clustered_rows(rng: np.random.Generator, n: int, d: int, clusters: int, spread: float = 0.35) -> np.ndarray:
    """``n`` unit rows around ``clusters`` random unit centres (a Gaussian of scale ``spread`` / sqrt(d) per
    coordinate around each), so IVF lists and PQ codebooks have structure to find, as real embeddings do.
    Drawn in chunks: the only full-size array is the result."""
    centres = unit_rows(rng, clusters, d)
    out = np.empty((n, d), np.float32)
    for lo in range(0, n, 65_536):
        hi = min(n, lo + 65_536)
        which = rng.integers(clusters, size=hi - lo)
        out[lo:hi] = centres[which] + rng.standard_normal((hi - lo, d), dtype=np.float32) * (spread / np.sqrt(d))
        out[lo:hi] /= np.linalg.norm(out[lo:hi], axis=1, keepdims=True)
    return out


def recall_at(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean over queries of |found top-k & exact top-k| / k."""
    return float(
        np.mean([len(set(f[:k].tolist()) & set(e[:k].tolist())) / k for f, e in zip(found, exact, strict=True)])
    )


def trained_template(factory: str, d: int, sample: np.ndarray, threads: int) -> tuple[faiss.Index, float]:
    """An empty bare FAISS index of ``factory`` (inner product over unit rows = the router's cosine) with the build
    parameters the index uses (efConstruction), trained on ``sample`` once; every bare side adds to a copy of it.
    Returns it and the training's seconds."""
    index = build(factory, d, Metric.IP, default_build_params(factory, Metric.IP, {}))
    faiss.omp_set_num_threads(threads)
    train_s, _ = best_of(1, lambda: index.train(sample) if not index.is_trained else None)
    return index, train_s


def interleaved(
    rounds: int,
    contenders: dict[str, Callable[[], Any]],
    times: dict[str, list[float]] | None = None,
    warm: bool = False,
) -> dict[str, tuple[float, Any]]:
    """The best seconds of each contender over ``rounds`` rounds, with what that run returned. Each round runs
    every contender once, in an order rotated from round to round, so that a slow spell of a shared machine
    falls on every side rather than on whichever side ran then. ``times``, when given, receives every round's
    seconds per contender (round order), for ratios paired within a round (:func:`paired_ratios`).

    ``warm``: each timed run follows an untimed run of the same contender, so every side is timed with its own
    data in the CPU caches, as an index answering queries back to back is. Without it the order decides: a side
    that follows its twin (the bare index at 2 threads after the same index at 1) runs warm, and the side after
    it runs on caches the other side filled."""
    names = list(contenders)
    best: dict[str, tuple[float, Any]] = {name: (float("inf"), None) for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if warm:
                contenders[name]()
            start = time.perf_counter()
            out = contenders[name]()
            seconds = time.perf_counter() - start
            if times is not None:
                times.setdefault(name, []).append(seconds)
            if seconds < best[name][0]:
                best[name] = (seconds, out)
    return best


def paired_ratios(times: dict[str, list[float]], side: str, against: str) -> list[float]:
    """Per round, the QPS of ``side`` over that of the fastest ``against@threads`` contender of the same round,
    sorted: the spread of a ratio whose headline is best against best. A round runs both sides within seconds of
    each other, so a slow spell of the machine moves both; the spread is how far one round's ratio is from
    another's."""
    mine = times[side]
    theirs = [seconds for name, seconds in times.items() if name.startswith(f"{against}@")]
    return sorted(min(other[r] for other in theirs) / mine[r] for r in range(len(mine)))


def at_threads(side: str, threads: list[int], search: Callable[[], Any]) -> dict[str, Callable[[], Any]]:
    """One contender per FAISS thread count of an in-process ``search`` (named ``side@threads``)."""

    def run(t: int) -> Callable[[], Any]:
        def timed() -> Any:
            faiss.omp_set_num_threads(t)
            return search()

        return timed

    return {f"{side}@{t}": run(t) for t in threads}


def fastest(best: dict[str, tuple[float, Any]], side: str, nq: int) -> dict:
    """The fastest thread count of ``side`` among :func:`at_threads` contenders timed by :func:`interleaved`."""
    mine = {int(name.split("@")[1]): v for name, v in best.items() if name.startswith(f"{side}@")}
    threads = min(mine, key=lambda t: mine[t][0])
    return {
        "threads": threads,
        "search_seconds": mine[threads][0],
        "qps": nq / mine[threads][0],
        "qps_by_threads": {t: nq / v[0] for t, v in mine.items()},
        "ids": mine[threads][1],
    }


def bare_kind(template: faiss.Index, params: dict, gallery, queries, k: int) -> tuple[dict, Callable[[], Any]]:
    """One bare FAISS index: a copy of the trained ``template`` holding ``gallery``, searched with ``params``.
    Returns its build figures and its search (the ids found), timed later beside the index."""
    index = faiss.clone_index(template)
    add_s, _ = best_of(1, lambda: index.add(gallery))
    keep: list = []
    sp = search_parameters(index, params, None, keep)

    def search(keep: list = keep) -> np.ndarray:  # holds what ``sp`` points to as long as the search exists
        return (index.search(queries, k) if sp is None else index.search(queries, k, params=sp))[1]

    return {"add_seconds": add_s, "bytes": len(faiss.serialize_index(index))}, search


def items_of(labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The item ids of a bare index's answer: its labels are positions in ``rows``, the items it holds (-1 kept)."""
    return np.where(labels >= 0, rows[np.maximum(labels, 0)], -1)


def bare_parts_kind(
    template: faiss.Index, params: dict, gallery, queries, k: int, moved: np.ndarray, shards: int
) -> tuple[dict, Callable[[], Any]]:
    """The router's FAISS work without the serving system: one bare index per part the router searches (each
    shard's old and new space, the same ids in each), each a copy of the trained ``template``, searched one after
    the other in this process and merged with numpy. Returns its build figures and its search.

    Set beside :func:`bare_kind` it separates what splitting the gallery costs FAISS itself (a coarse search, the
    list visits or a graph descent per part) from what serving adds (Ray calls, the merge, processes sharing
    cores), which is the ratio of the index to this."""
    n = len(gallery)
    in_new = np.zeros(n, bool)
    in_new[moved] = True
    owner = shard_of(np.arange(n, dtype=np.int64), shards)
    parts: list[tuple[faiss.Index, np.ndarray, Any]] = []
    keep: list = []
    start = time.perf_counter()
    for shard in range(shards):
        for new_space in (False, True):
            rows = np.flatnonzero((owner == shard) & (in_new == new_space))
            if not len(rows):
                continue
            index = faiss.clone_index(template)
            index.add(gallery[rows])
            parts.append((index, rows, search_parameters(index, params, None, keep)))
    build_s = time.perf_counter() - start

    def search_all(keep: list = keep) -> np.ndarray:  # holds what the parameters point to, as in bare_kind
        scores, ids = [], []
        for index, rows, sp in parts:
            found_scores, labels = index.search(queries, k) if sp is None else index.search(queries, k, params=sp)
            scores.append(found_scores)
            ids.append(items_of(labels, rows))
        all_scores, all_ids = np.concatenate(scores, axis=1), np.concatenate(ids, axis=1)
        best = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(all_ids, best, axis=1)

    return {"parts": len(parts), "build_seconds": build_s}, search_all


def transform_rows(n: int, moved: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """The items a transform-path backfill transforms after the moves (every item not moved) and the part of those
    re-embedded in place (every ``1/beta``-th)."""
    still_old = np.setdiff1d(np.arange(n, dtype=np.int64), moved)
    return still_old, (still_old[:: max(1, round(1 / beta))] if beta > 0 else still_old[:0])


def bare_replaced_kind(
    template: faiss.Index, params: dict, gallery, queries, k: int, moved: np.ndarray, beta: float
) -> tuple[dict, Callable[[], Any]] | None:
    """For a graph kind, which cannot remove a row: one bare index over the items of the transform path after the
    same replacements, built by the index's adds in the index's order (the moved items, then the items transformed,
    then the re-embedded ones again, in batches of ``CHUNK``), the replaced rows left in the graph and excluded by
    an IDSelectorBitmap, FAISS's own way to keep rows out of a search. Returns its build figures and its search
    (the item ids found); None for a kind that removes rows (its bare index after the replacements is the bare
    index). Set beside :func:`bare_kind` it separates what the replaced rows cost FAISS itself from what serving
    adds."""
    if layout_of(template) is not Layout.GRAPH:
        return None
    still_old, reembedded = transform_rows(len(gallery), moved, beta)
    rows = np.concatenate([moved, still_old, reembedded])
    alive = np.ones(len(rows), bool)
    alive[len(moved) + np.searchsorted(still_old, reembedded)] = False  # the rows the re-embedding replaced
    index = faiss.clone_index(template)
    start = time.perf_counter()
    for lo in range(0, len(rows), CHUNK):
        index.add(gallery[rows[lo : lo + CHUNK]])
    build_s = time.perf_counter() - start
    bitmap = np.packbits(alive, bitorder="little")
    selector = faiss.IDSelectorBitmap(len(rows), faiss.swig_ptr(bitmap))
    keep: list = [bitmap, selector]
    sp = search_parameters(index, params, selector, keep)

    def search(keep: list = keep) -> np.ndarray:  # holds the bitmap and the selector as long as the search exists
        labels = index.search(queries, k, params=sp)[1]
        return items_of(labels, rows)

    return {"build_seconds": build_s, "rows": len(rows), "replaced_rows": int((~alive).sum())}, search


def router_kind(
    factory: str,
    params: dict,
    gallery,
    sample,
    queries,
    k: int,
    shards: int,
    args,
    moved: np.ndarray,
    bare: dict[str, Callable[[], Any]],
    parts: dict[str, Callable[[], Any]],
    replaced: dict[str, Callable[[], Any]],
) -> dict:
    """The index over ``shards`` shards of ``args.cpus / shards`` CPUs each: train both spaces on ``sample``,
    load the gallery, time one-space queries (every item still old), move the items ``moved`` to the new space
    with the same vectors, then time rank_merge queries. Each search is timed in :func:`interleaved` rounds with
    the bare contenders ``bare`` (and, after the moves, ``parts``), through an IndexSearcher and the router."""
    n = len(gallery)
    ids = np.arange(n, dtype=np.int64)
    index = IndexConfig(factory=factory, metric=Metric.COSINE, search_params=params)
    config = RouterConfig(name=KINDS_INDEX, shards=shards, shard_num_cpus=args.cpus / shards, index=index)
    router = create_index(config)
    try:
        start = time.perf_counter()
        get(router.train.remote(Space.OLD, sample, "v1"))
        get(router.train.remote(Space.NEW, sample, "v2"))
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        for lo in range(0, n, CHUNK):
            get(router.load_old.remote(ids[lo : lo + CHUNK], gallery[lo : lo + CHUNK], "v1"))
        load_s = time.perf_counter() - start
        searcher = IndexSearcher.connect(config.name)
        # Before any move every item is in the old space: one FAISS search per shard, merged across the shards,
        # the query the bare index answers too.
        one_space = timed_paths(router, searcher, args.repeats, bare, queries, None, k, Strategy.OLD)
        start = time.perf_counter()
        for lo in range(0, len(moved), CHUNK):
            part = moved[lo : lo + CHUNK]
            get(router.upsert.remote(ids[part], gallery[part], Space.NEW, "v2"))
        upsert_s = time.perf_counter() - start
        actors = [ray.get_actor(config.shard_name(i), namespace=NAMESPACE) for i in range(shards)]
        for actor in actors:  # a graph index rebuilds in the background after the moves: time the settled index
            get(actor.wait_for_rebuilds.remote())
        two_spaces = timed_paths(
            router, searcher, args.repeats, {**bare, **parts}, queries, queries, k, Strategy.RANK_MERGE
        )
        # The transform path: the items still old are transformed into the new space, then some of those are
        # re-embedded in place (same vectors), so the new space holds every item and has replaced rows (a graph
        # keeps them as deleted rows until its rebuild), as in a transform-path backfill under way. Its query is
        # one FAISS search per shard, against the bare index over the same items.
        still_old, reembedded = transform_rows(n, moved, args.beta)
        start = time.perf_counter()
        for state, batch in ((Space.TRANSFORMED, still_old), (Space.NEW, reembedded)):
            for lo in range(0, len(batch), CHUNK):
                part = batch[lo : lo + CHUNK]
                get(router.upsert.remote(part, gallery[part], state, "v2"))
        transform_s = time.perf_counter() - start
        news = [get(actor.describe.remote())["indexes"]["new"] for actor in actors]
        deleted = [new["stored"] - new["live"] for new in news]
        for actor in actors:
            get(actor.wait_for_rebuilds.remote())
        transform = timed_paths(
            router, searcher, args.repeats, {**bare, **replaced}, None, queries, k, Strategy.COMPATIBLE
        )
        described = [get(actor.describe.remote()) for actor in actors]
        sizes = [get(actor.index_bytes.remote()) for actor in actors]
    finally:
        destroy_index(config.name)
    return {
        "shards": shards,
        "train_seconds": train_s,
        "load_seconds": load_s,
        "upsert_seconds": upsert_s,
        "moved": len(moved),
        "one_space": one_space,
        "two_spaces": two_spaces,
        "transform": transform,
        "transform_seconds": transform_s,
        "transformed": len(still_old),
        "reembedded_in_place": len(reembedded),
        "deleted_rows_new_space": sum(deleted),
        "bytes_served": sum(s.get("pending", 0) + s.get("new", 0) for s in sizes),
        "bytes_held": sum(sum(s.values()) for s in sizes),
        "indexes": [d["indexes"] for d in described],
    }


def timed_paths(
    router, searcher, rounds: int, bare: dict[str, Callable[[], Any]], q_old, q_new, k: int, strategy: Strategy
) -> tuple[dict[str, tuple[float, Any]], dict[str, list[float]]]:
    """The same search through an IndexSearcher (the headline: how the HTTP service and a client that keeps the
    shards search) and through the router (one Ray hop more), in :func:`interleaved` rounds with the ``bare``
    contenders; both paths must answer the same. Returns each contender's best (seconds, answer) and every
    round's seconds."""
    times: dict[str, list[float]] = {}
    best = interleaved(
        rounds,
        {
            **bare,
            "searcher": lambda: searcher.search(q_old, q_new, k, strategy),
            "router": lambda: get(router.search.remote(q_old, q_new, k, strategy)),
        },
        times,
        warm=True,
    )
    if not all(np.array_equal(a, b) for a, b in zip(best["searcher"][1], best["router"][1], strict=True)):
        raise RuntimeError(f"the searcher and the router answered a {strategy} search differently")
    return best, times


def kinds_main(argv: list[str] | None = None) -> dict:
    """The per-kind benchmark (see the module docstring); writes JSON and returns it."""
    load_start = os.getloadavg()
    parser = argparse.ArgumentParser(prog="bench_index.py kinds", description="index kinds vs bare FAISS")
    parser.add_argument(
        "--factories",
        default=";".join(KIND_FACTORIES),
        help="FAISS factory strings separated by ';' (default: the six kinds of the issue)",
    )
    parser.add_argument("--n", type=int, default=1_000_000, help="gallery size (default 1M)")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=1000, help="clusters of the synthetic gallery")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--train-size", type=int, default=100_000, help="training sample (both sides)")
    parser.add_argument(
        "--shards", default="1,2", help="shard counts the router serves with, comma-separated (the fastest counts)"
    )
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="total threads, both sides")
    parser.add_argument("--beta", type=float, default=0.5, help="fraction moved to the new space")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; each side keeps its best")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/bench_index_kinds.json")
    parser.add_argument("--quick", action="store_true", help=f"small run, fast-training kinds: defaults {KINDS_QUICK}")
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**KINDS_QUICK)
    args = parser.parse_args(argv)
    factories = [f.strip() for f in args.factories.split(";") if f.strip()]
    shard_counts = sorted({int(s) for s in str(args.shards).split(",") if s.strip()})
    if not shard_counts or min(shard_counts) < 1:
        parser.error(f"--shards needs shard counts >= 1, got {args.shards!r}")
    for factory in factories:
        IndexConfig(factory=factory)  # a bad string fails here, before minutes of data generation

    rng = np.random.default_rng(args.seed)
    gallery = clustered_rows(rng, args.n, args.d, args.clusters)
    queries = gallery[rng.integers(args.n, size=args.queries)] + rng.standard_normal(
        (args.queries, args.d), dtype=np.float32
    ) * (0.1 / np.sqrt(args.d))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    sample = gallery[np.sort(rng.permutation(args.n)[: min(args.train_size, args.n)])]
    faiss.omp_set_num_threads(args.cpus)
    exact = faiss.IndexFlatIP(args.d)
    exact.add(gallery)
    _, truth = exact.search(queries, RECALL_K)
    del exact

    owns_ray = not ray.is_initialized()
    init_ray(num_cpus=args.cpus)
    results = {}
    try:
        for factory in factories:
            params = default_params(factory, Metric.COSINE, {})
            threads = sorted({args.cpus, 1})
            moved = np.sort(rng.permutation(args.n)[: int(args.beta * args.n)])
            template, train_s = trained_template(factory, args.d, sample, max(threads))
            built, bare_search = bare_kind(template, params, gallery, queries, RECALL_K)
            bare_side = at_threads("bare", threads, bare_search)
            replaced = bare_replaced_kind(template, params, gallery, queries, RECALL_K, moved, args.beta)
            replaced_built, replaced_side = (
                (None, {}) if replaced is None else (replaced[0], at_threads("replaced", threads, replaced[1]))
            )
            nq = len(queries)
            by_shards = {}
            for shards in shard_counts:
                parts_built, parts_search = bare_parts_kind(template, params, gallery, queries, RECALL_K, moved, shards)
                parts_side = at_threads("parts", threads, parts_search)
                ours = router_kind(
                    factory,
                    params,
                    gallery,
                    sample,
                    queries,
                    RECALL_K,
                    shards,
                    args,
                    moved,
                    bare_side,
                    parts_side,
                    replaced_side,
                )
                del parts_side, parts_search  # the parts' indexes
                (one, one_times), (two, two_times) = ours.pop("one_space"), ours.pop("two_spaces")
                moving, moving_times = ours.pop("transform")
                bare, one_bare, parts = fastest(two, "bare", nq), fastest(one, "bare", nq), fastest(two, "parts", nq)
                transform_bare = fastest(moving, "bare", nq)
                transform_bare.pop("ids")
                transform_qps, transform_router_qps = nq / moving["searcher"][0], nq / moving["router"][0]
                # a graph kind: the bare index with the same replaced rows, and the index against it
                transform_replaced: dict[str, Any] = {}
                if replaced_built is not None:
                    same_rows = fastest(moving, "replaced", nq)
                    same_rows["recall_at_10"] = recall_at(same_rows.pop("ids"), truth, RECALL_K)
                    transform_replaced = {
                        "transform_bare_replaced": {**replaced_built, **same_rows},
                        "transform_replaced_qps_ratio": same_rows["qps"] / transform_bare["qps"],
                        "transform_serving_qps_ratio": transform_qps / same_rows["qps"],
                        "transform_serving_qps_ratio_rounds": paired_ratios(moving_times, "searcher", "replaced"),
                    }
                index_qps, router_qps = nq / two["searcher"][0], nq / two["router"][0]
                one_qps, one_router_qps = nq / one["searcher"][0], nq / one["router"][0]
                our_recall = recall_at(two["searcher"][1].ids, truth, RECALL_K)
                truth_recall = recall_at(bare.pop("ids"), truth, RECALL_K)
                parts_recall = recall_at(parts.pop("ids"), truth, RECALL_K)
                one_bare.pop("ids")
                by_shards[str(shards)] = {
                    "bare": {**bare, "recall_at_10": truth_recall},
                    "bare_parts": {**parts_built, **parts, "recall_at_10": parts_recall},
                    "index": {
                        **ours,
                        "search_seconds": two["searcher"][0],
                        "qps": index_qps,
                        "router_qps": router_qps,
                        "recall_at_10": our_recall,
                        "one_space_qps": one_qps,
                        "one_space_router_qps": one_router_qps,
                        "one_space_recall_at_10": recall_at(one["searcher"][1].ids, truth, RECALL_K),
                        "transform_qps": transform_qps,
                        "transform_router_qps": transform_router_qps,
                        "transform_recall_at_10": recall_at(moving["searcher"][1].ids, truth, RECALL_K),
                        "bytes_per_item_served": ours["bytes_served"] / args.n,
                        "bytes_per_item_held": ours["bytes_held"] / args.n,
                    },
                    # the bare index timed in the one-space rounds
                    "one_space_bare": one_bare,
                    "qps_ratio": index_qps / bare["qps"],
                    # each ratio paired within a round, sorted: how far the best-against-best figure can move
                    "qps_ratio_rounds": paired_ratios(two_times, "searcher", "bare"),
                    "serving_qps_ratio_rounds": paired_ratios(two_times, "searcher", "parts"),
                    "one_space_qps_ratio_rounds": paired_ratios(one_times, "searcher", "bare"),
                    "transform_qps_ratio_rounds": paired_ratios(moving_times, "searcher", "bare"),
                    # the two factors of qps_ratio: what splitting costs FAISS, and what serving adds to that
                    "split_qps_ratio": parts["qps"] / bare["qps"],
                    "serving_qps_ratio": index_qps / parts["qps"],
                    "recall_difference": our_recall - truth_recall,
                    # every item still old: the one-space query against the bare index, serving alone
                    "one_space_qps_ratio": one_qps / one_bare["qps"],
                    # the bare index timed in the transform-path rounds
                    "transform_bare": transform_bare,
                    # a transform-path backfill under way: every item in the new space, some re-embedded in place
                    "transform_qps_ratio": transform_qps / transform_bare["qps"],
                    "router_transform_qps_ratio": transform_router_qps / transform_bare["qps"],
                    # a graph kind: what the replaced rows cost FAISS itself, and what serving adds to that
                    **transform_replaced,
                    # the same searches through the router (one Ray hop more)
                    "router_qps_ratio": router_qps / bare["qps"],
                    "router_one_space_qps_ratio": one_router_qps / one_bare["qps"],
                }
            del template, bare_side, bare_search, replaced, replaced_side  # the bare indexes
            fastest_shards = max(by_shards, key=lambda s: by_shards[s]["qps_ratio"])
            one_space = max(by_shards, key=lambda s: by_shards[s]["one_space_qps_ratio"])
            transform = max(by_shards, key=lambda s: by_shards[s]["transform_qps_ratio"])
            headline = by_shards[fastest_shards]
            replaced_figures: dict[str, Any] = {
                key: value for key, value in by_shards[transform].items() if key.startswith(REPLACED_PREFIXES)
            }
            results[factory] = {
                "search_params": params,
                "build_params": default_build_params(factory, Metric.IP, {}),
                **{key: value for key, value in headline.items() if key != "bare"},
                "bare": {
                    "train_seconds": train_s,
                    **built,
                    **headline["bare"],
                    "bytes_per_item": built["bytes"] / args.n,
                },
                "shards": int(fastest_shards),
                "one_space_qps_ratio": by_shards[one_space]["one_space_qps_ratio"],
                "one_space_qps_ratio_rounds": by_shards[one_space]["one_space_qps_ratio_rounds"],
                "one_space_shards": int(one_space),
                "router_one_space_qps_ratio": by_shards[one_space]["router_one_space_qps_ratio"],
                "transform_qps_ratio": by_shards[transform]["transform_qps_ratio"],
                "transform_qps_ratio_rounds": by_shards[transform]["transform_qps_ratio_rounds"],
                "transform_shards": int(transform),
                "router_transform_qps_ratio": by_shards[transform]["router_transform_qps_ratio"],
                "transform_recall_at_10": by_shards[transform]["index"]["transform_recall_at_10"],
                **replaced_figures,
                "by_shards": by_shards,
            }
            r = results[factory]
            print(
                f"{factory:>20}: recall@10 {r['index']['recall_at_10']:.3f} (bare {r['bare']['recall_at_10']:.3f}), "
                f"{r['index']['qps']:,.0f} QPS (bare {r['bare']['qps']:,.0f}, ratio {r['qps_ratio']:.2f} = split "
                f"{r['split_qps_ratio']:.2f} x serving {r['serving_qps_ratio']:.2f}, {r['shards']} shard(s); one "
                f"space {r['one_space_qps_ratio']:.2f}, {r['one_space_shards']} shard(s); transform path "
                f"{r['transform_qps_ratio']:.2f}, recall@10 {r['transform_recall_at_10']:.3f}, "
                f"{r['transform_shards']} shard(s)), "
                f"{r['index']['bytes_per_item_served']:.0f} B/item served "
                f"({r['index']['bytes_per_item_held']:.0f} held; bare {r['bare']['bytes_per_item']:.0f})"
            )
    finally:
        if owns_ray:
            ray.shutdown()
    load_end = os.getloadavg()
    result = {
        "benchmark": "bench_index_kinds",
        "what": f"rank_merge top-{RECALL_K} of {args.queries} queries over {args.n} clustered unit vectors (d={args.d})"
        f", a fraction {args.beta} moved to the new space with the same vectors, served by "
        + " or ".join(f"{s} shard(s) x {args.cpus / s:g} CPU" for s in shard_counts)
        + f" (the fastest counts), vs one bare FAISS index of the same factory, build and search parameters "
        f"(best of {sorted({args.cpus, 1})} threads), each side the best of {args.repeats} interleaved rounds, each "
        "timed search right after an untimed one of the same side; "
        "recall against exact search",
        "config": vars(args) | {"factories": factories, "shards": shard_counts},
        "machine": {**machine_info(), "loadavg_start": load_start, "loadavg_end": load_end},
        "kinds": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"load average {load_start[0]:.1f} -> {load_end[0]:.1f} on {os.cpu_count()} cores; wrote {out}")
    return result


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["kinds"]:
        kinds_main(sys.argv[2:])
    else:
        main()
