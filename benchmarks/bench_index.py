"""Merged-query throughput of the sharded index vs a bare FAISS IndexFlatIP, side by side in one process.

The baseline is the best bare configuration with at most the same total threads: one IndexFlatIP over
the whole gallery in this process, searching the same query batch with ``--cpus`` FAISS threads and with
one thread (OpenMP barriers suffer on a busy machine), whichever is faster. The index runs
``--shards`` shard actors with ``--cpus / --shards`` CPUs each (so the same total threads) behind the
router, with a fraction ``--beta`` of the gallery backfilled into the new space. Each measurement is the
best of ``--repeats`` runs, taken while the other side is idle. Writes JSON (default
benchmarks/results/bench_index.json) and prints the ratio merged QPS / bare QPS per strategy.

    PYTHONPATH=. python benchmarks/bench_index.py --n 1000000 --d 128 --queries 1000 --k 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import faiss
import numpy as np
import ray

from raybackfill import NAMESPACE
from raybackfill.index.router import RouterConfig, create_index, destroy_index, get

CHUNK = 10_000  # rows per load_old / upsert call, like a backfill batch


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def best_of(repeats: int, fn) -> tuple[float, object]:
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="gallery size (default 1M)")
    parser.add_argument("--d", type=int, default=128, help="dim (default 128)")
    parser.add_argument("--queries", type=int, default=1000, help="queries per search call (default 1000)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="total threads, both sides")
    parser.add_argument("--beta", type=float, default=0.5, help="backfilled fraction for merged queries")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/bench_index.json")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    ids = np.arange(args.n, dtype=np.int64)
    old = unit_rows(rng, args.n, args.d)
    queries = unit_rows(rng, args.queries, args.d)

    bare = {t: bare_flat_ip(old, queries, args.k, t, args.repeats) for t in sorted({args.cpus, 1})}
    best_threads = min(bare, key=lambda t: bare[t][1])
    add_s, bare_s, bare_ids = bare[best_threads]

    ray.init(num_cpus=args.cpus, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    config = RouterConfig(name="bench-index", shards=args.shards, shard_num_cpus=args.cpus / args.shards)
    router = create_index(config)
    try:
        start = time.perf_counter()
        for lo in range(0, args.n, CHUNK):
            get(router.load_old.remote(ids[lo : lo + CHUNK], old[lo : lo + CHUNK], "v1"))
        load_s = time.perf_counter() - start

        old_s, old_result = best_of(args.repeats, lambda: get(router.search.remote(queries, None, args.k, "old")))
        same_as_bare = float(np.mean(old_result.ids == bare_ids))

        moved = rng.permutation(args.n)[: int(args.beta * args.n)]
        new = unit_rows(rng, len(moved), args.d)
        start = time.perf_counter()
        for lo in range(0, len(moved), CHUNK):
            get(router.upsert.remote(ids[moved[lo : lo + CHUNK]], new[lo : lo + CHUNK], "new", "v2"))
        upsert_s = time.perf_counter() - start

        strategies = {}
        for strategy in ("old", "compatible", "rank_merge"):
            def search(s=strategy):
                return get(router.search.remote(queries, queries, args.k, s))

            seconds, _ = best_of(args.repeats, search)
            strategies[strategy] = {"seconds": seconds, "qps": args.queries / seconds,
                                    "ratio_to_bare": (args.queries / seconds) / (args.queries / bare_s)}
    finally:
        destroy_index(config.name)
        ray.shutdown()

    result = {
        "benchmark": "bench_index",
        "config": vars(args),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "faiss": faiss.__version__,
                    "ray": ray.__version__},
        "baseline": {"what": f"bare faiss.IndexFlatIP, one process, best of {sorted(bare)} threads",
                     "threads": best_threads, "add_seconds": add_s, "search_seconds": bare_s,
                     "qps": args.queries / bare_s,
                     "qps_by_threads": {t: args.queries / b[1] for t, b in bare.items()}},
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
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"bare IndexFlatIP: {args.queries / bare_s:,.0f} QPS ({best_threads} threads)")
    print(f"index at beta=0, strategy old: {args.queries / old_s:,.0f} QPS (ids equal to bare: {same_as_bare:.4f})")
    for name, r in strategies.items():
        print(f"index at beta={args.beta}, {name}: {r['qps']:,.0f} QPS, ratio {r['ratio_to_bare']:.2f}")
    print(f"upsert: {result['index']['upsert_items_per_s'] or 0:,.0f} items/s; wrote {out}")
    return result


if __name__ == "__main__":
    main()
