"""scale_10m: a clustered gallery of 10M x 128 old vectors served by 4 shards, backfilled through the transform path
under live queries, on one box.

    python -m benchmarks.bench_scale --out docs/benchmarks/scale.json               # 1M and 10M, IVF1024,SQ8
    python -m benchmarks.bench_scale --quick --out /tmp/scale.json                  # 20k and 60k, a minute

For each size n (the largest is the headline, every size feeds the growth exponents):

1. the inputs are written in chunks (no process holds the gallery): the old-embedding table (unit vectors around
   fixed cluster centres, so IVF lists have structure to find, as real embeddings do), a gallery of ids (one tiny
   image each: the transform path reads no pixels) and the forward transformation;
2. ``raybackfill.index.loading.load_old_table`` streams the old table into a fresh index (``--shards`` shards of
   ``--index``), training the old space on a bounded sample first;
3. single ``compatible`` queries (new-model queries: fresh points through the same transformation) are timed idle;
4. ``run_backfill`` moves every item to the new space through the transform path (plan by id, budget 0: no
   image is re-embedded) while a thread keeps timing single queries;
5. recall@10 of the served old-space answer (strategy ``old``, fresh points of the same clusters as queries),
   measured right after the load, against an exact search (a chunked brute-force scan of the old table), and the
   peak memory (PSS and RSS sum) of this process and every Ray process it started, sampled every second from the
   load to the end of the backfill;
6. with ``--paced-rate``, the index is rolled back and the backfill runs again at that pace (``max_rate``)
   while the same probes run: the latency an operator sees when the backfill is paced to spare the service;
7. the index is rolled back once more and the backfill runs alone, unpaced and without probes: its own rate
   (the probes of step 4 are a closed loop of queries, which the index serves before the backfill's work, so
   the rate under them depends on how many queries that loop sends).

The IVF ``nprobe`` of every query is chosen on *validation* queries (fresh points of another seed): the smallest
of NPROBE_CANDIDATES whose validation recall@10 reaches the recall target plus VALIDATION_MARGIN (when none does,
the smallest within RECALL_TIE of the best: past that, the codes limit recall, not the lists probed); the reported
recall is measured on the separate evaluation queries, which never choose anything.

The forward transformation is the FCT model of the throughput benchmarks, trained here for a few seconds to map
the gallery's clusters to themselves (:func:`save_compatible_transformation`): like a trained FCT, it keeps the
structure of the space, so the new index's lists are balanced and a query over it costs what it would in
production (an untrained MLP maps every point to nearly one direction: one huge list, slow queries). Recall is
measured on the old space, the set whose exact answer the benchmark knows.

The side-by-side baseline of the QPS of each index kind is ``bench_index.py kinds``; this benchmark is about
what the largest gallery this box can hold costs in memory, time and recall.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from benchmarks import bench_backfill, bench_index
from benchmarks.run import PeakMemory, loglog_exponent, phase_rates, transform_path
from raybackfill.backfill.run import run_backfill
from raybackfill.data import storage
from raybackfill.data.images import encode_png
from raybackfill.data.schema import EMBEDDING, ID, IMAGE, embedding_table, vectors_of
from raybackfill.index.loading import LoadConfig, load_old_table
from raybackfill.index.router import RouterConfig, create_index, destroy_index, get
from raybackfill.index.shard import IndexConfig
from raybackfill.models.artifacts import ModelSpec, load_model, save_model
from raybackfill.models.registry import build_model
from raybackfill.runtime import init_ray
from raybackfill.types import Method, Space, Strategy

FULL = {
    "sizes": "1000000,10000000",
    "index": "IVF1024,SQ8",
    "probes": 1000,
    "recall_queries": 200,
    "paced_rate": 20_000.0,
    "fit_steps": 1000,
}
QUICK = {
    "sizes": "20000,60000",
    "index": "IVF64,SQ8",
    "probes": 60,
    "recall_queries": 50,
    "paced_rate": 4_000.0,
    "fit_steps": 50,
}
NPROBE_CANDIDATES = (4, 8, 16, 32, 64, 128, 256)
RECALL_TARGET = 0.90
VALIDATION_MARGIN = 0.01  # validation and evaluation queries differ; aim a little above the target
RECALL_TIE = 0.005  # validation recalls closer than this are the same (one hit in 200 queries x 10 is 0.0005)
INDEX_NAME = "bench-scale-10m"
DIM = bench_backfill.OLD_DIM
CLUSTERS = 4096
SPREAD = 0.35
WINDOW_S = 10.0  # width of the latency windows reported across a backfill
FIT_BATCH = 1024  # the transformation's fit: 1000 steps take ~20 s on 2 cores, mean cosine to its input ~0.98
ROWS_PER_FILE = 262_144
CHUNK = 65_536
K = 10
STRATEGY = Strategy.COMPATIBLE  # what a forward-transformation upgrade serves from its instant phase on
TARGETS = {
    "peak_pss_gb": "< 16",
    "recall_at_10": ">= 0.90",
    "backfill_alone_items_per_s": ">= 20000",
    "p99_ratio_paced": "<= 2.0",
}


def clustered_chunks(centres: np.ndarray, n: int, seed: int, spread: float = SPREAD):
    """``n`` unit rows around ``centres`` in chunks of at most CHUNK rows (a Gaussian of scale spread/sqrt(d) per
    coordinate around a uniformly drawn centre), the same rows for the same seed whatever the consumer keeps."""
    rng = np.random.default_rng(seed)
    d = centres.shape[1]
    for lo in range(0, n, CHUNK):
        m = min(CHUNK, n - lo)
        rows = centres[rng.integers(len(centres), size=m)]
        rows = rows + rng.standard_normal((m, d), dtype=np.float32) * np.float32(spread / np.sqrt(d))
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        yield lo, rows.astype(np.float32, copy=False)


def write_inputs(root: str, n: int, centres: np.ndarray, seed: int, fit_steps: int) -> dict[str, str]:
    """The old-embedding table, the gallery (ids and one tiny PNG each) and the models, written file by file."""
    paths = {name: os.path.join(root, name) for name in ("gallery", "old", "backbone", "fct", "out")}
    for name in ("gallery", "old"):
        os.makedirs(paths[name], exist_ok=True)
    png = encode_png(np.zeros((8, 8, 3), dtype=np.uint8))
    file_rows: list[pa.Table] = []
    part = 0

    def flush() -> None:
        nonlocal part, file_rows
        if not file_rows:
            return
        old = pa.concat_tables(file_rows)
        pq.write_table(old, os.path.join(paths["old"], f"part-{part:05d}.parquet"), row_group_size=CHUNK)
        ids = old.column(ID)
        gallery = pa.table({ID: ids, IMAGE: pa.array([png], pa.binary()).take(pa.array(np.zeros(len(ids), np.int64)))})
        pq.write_table(gallery, os.path.join(paths["gallery"], f"part-{part:05d}.parquet"), row_group_size=CHUNK)
        part += 1
        file_rows = []

    for lo, rows in clustered_chunks(centres, n, seed):
        file_rows.append(embedding_table(np.arange(lo, lo + len(rows), dtype=np.int64), rows, model="old-v1"))
        if sum(t.num_rows for t in file_rows) >= ROWS_PER_FILE:
            flush()
    flush()
    bench_backfill.save_backbone(paths["backbone"], "small_cnn")
    save_compatible_transformation(paths["fct"], centres, seed, fit_steps)
    return paths


def save_compatible_transformation(uri: str, centres: np.ndarray, seed: int, steps: int, sample: int = 50_000) -> None:
    """The forward transformation the transform path runs, trained for a few seconds (Adam, cosine loss) to map
    points of the gallery's clusters to themselves: a compatible upgrade whose new space keeps the old space's
    structure, as a trained FCT's does, so the new index's lists are as balanced as the old one's and queries
    over it cost what they would in production. Its cost per item is the model's, whatever its weights."""
    torch.manual_seed(seed)
    model = build_model("forward_transformation", **bench_backfill.FCT_KWARGS).train()
    points = torch.from_numpy(np.concatenate([rows for _, rows in clustered_chunks(centres, sample, seed + 7)]))
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = points[torch.randint(len(points), (FIT_BATCH,), generator=generator)]
        loss = (1 - torch.nn.functional.cosine_similarity(model(batch), batch)).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    spec = ModelSpec("forward_transformation", "fct-v2", bench_backfill.FCT_KWARGS, method=Method.FCT)
    save_model(model.eval(), uri, spec)


def transform(fct_uri: str, old: np.ndarray) -> np.ndarray:
    """New-model queries: old-space points through the forward transformation (unit rows)."""
    model = load_model(fct_uri).module.eval()
    with torch.inference_mode():
        new = model(torch.from_numpy(old)).numpy().astype(np.float32)
    return new / np.linalg.norm(new, axis=1, keepdims=True)


def exact_topk(table_uri: str, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the exact inner-product top-k of every query over a table's unit vectors, scanned row group by row
    group (the table never sits in memory whole); ties broken by id."""
    best_ids = np.full((len(queries), 0), -1, np.int64)
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    fs, _ = storage.resolve(table_uri)
    for info in storage.committed_files(table_uri):
        with fs.open_input_file(info.path) as handle:
            parquet = pq.ParquetFile(handle)
            for group in range(parquet.num_row_groups):
                chunk = parquet.read_row_group(group, columns=[ID, EMBEDDING])
                vectors = vectors_of(chunk)
                vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
                scores = queries @ vectors.T
                ids = np.broadcast_to(chunk.column(ID).to_numpy(), scores.shape)
                all_scores = np.concatenate([best_scores, scores], axis=1)
                all_ids = np.concatenate([best_ids, ids], axis=1)
                order = np.lexsort((all_ids, -all_scores), axis=1)[:, :k]
                best_scores = np.take_along_axis(all_scores, order, axis=1)
                best_ids = np.take_along_axis(all_ids, order, axis=1)
    return best_ids


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact top-k that the served top-k holds."""
    return float(np.mean([len(np.intersect1d(f, e)) / len(e) for f, e in zip(found, exact, strict=True)]))


def choose_nprobe(router, queries: np.ndarray, exact: np.ndarray, nlist: int) -> tuple[int | None, dict[int, float]]:
    """The smallest candidate nprobe whose recall@10 on these (validation) queries reaches the target plus the
    margin (when none does, the smallest within RECALL_TIE of the best), and the recall of each candidate tried.
    None for a non-IVF index."""
    if not nlist:
        return None, {}
    tried: dict[int, float] = {}
    for nprobe in (c for c in NPROBE_CANDIDATES if c <= nlist):
        found = get(router.search.remote(queries, None, K, Strategy.OLD, {"nprobe": nprobe}))
        tried[nprobe] = recall_at(found.ids, exact)
        if tried[nprobe] >= RECALL_TARGET + VALIDATION_MARGIN:
            return nprobe, tried  # candidates rise: the first to reach the goal is the smallest
    # None reaches it: probing more lists does not help past the best recall (the codes limit it), so the smallest
    # nprobe within RECALL_TIE of the best.
    best = max(tried.values())
    return min(n for n, r in tried.items() if r >= best - RECALL_TIE), tried


def nlist_of(factory: str) -> int:
    """The IVF list count of a factory string (0 when it has no IVF stage)."""
    index = faiss.index_factory(DIM, factory)  # held here: the extracted IVF lives inside it
    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else 0


def timed_queries(
    router,
    queries: np.ndarray,
    stop: threading.Event | None = None,
    params: dict | None = None,
    starts: list[float] | None = None,
) -> list[float]:
    """Seconds of single-query searches, one call at a time, through every query once or (with ``stop``) round
    and round until it is set; ``starts`` collects when each began (perf_counter)."""
    seconds: list[float] = []
    i = 0
    while True:
        if stop is None and i == len(queries):
            return seconds
        if stop is not None and stop.is_set():
            return seconds
        q = queries[i % len(queries) : i % len(queries) + 1]
        start = time.perf_counter()
        get(router.search.remote(None, q, K, STRATEGY, params))
        seconds.append(time.perf_counter() - start)
        if starts is not None:
            starts.append(start)
        i += 1


def backfill_under_probes(router, config, queries: np.ndarray, params: dict | None):
    """Run one backfill while a thread times single queries; (summary, seconds, probe seconds, load averages)."""
    stop = threading.Event()
    live: list[float] = []
    starts: list[float] = []
    prober = threading.Thread(
        target=lambda: live.extend(timed_queries(router, queries, stop, params, starts)), daemon=True
    )
    loadavg_start = os.getloadavg()
    start = time.perf_counter()
    prober.start()
    try:
        summary = run_backfill(config)
    finally:
        stop.set()
        prober.join()
    windows = latency_windows(np.asarray(starts) - start, np.asarray(live[: len(starts)]))
    return summary, time.perf_counter() - start, live, (loadavg_start, os.getloadavg()), windows


def latency_windows(offsets: np.ndarray, seconds: np.ndarray, width_s: float = WINDOW_S) -> list[dict]:
    """p50/p99 of the queries that began in each ``width_s`` window of a run (where in the run the tail is)."""
    rows = []
    for lo in np.arange(0.0, float(offsets.max()) + width_s if len(offsets) else 0.0, width_s):
        inside = seconds[(offsets >= lo) & (offsets < lo + width_s)]
        if len(inside):
            p50, p99 = np.percentile(inside, [50, 99]) * 1000
            rows.append({"start_s": float(lo), "queries": len(inside), "p50_ms": float(p50), "p99_ms": float(p99)})
    return rows


def scale_point(root: str, n: int, args: argparse.Namespace, centres: np.ndarray) -> dict:
    """Write, load, choose nprobe, probe idle, backfill under probes (unpaced, then paced), check recall."""
    started = time.perf_counter()
    paths = write_inputs(os.path.join(root, f"n{n}"), n, centres, args.seed, args.fit_steps)
    write_s = time.perf_counter() - started
    q_old = np.concatenate([rows for _, rows in clustered_chunks(centres, args.probes, args.seed + 1)])
    queries = transform(paths["fct"], q_old)
    recall_q = q_old[: args.recall_queries]
    valid_q = np.concatenate([rows for _, rows in clustered_chunks(centres, args.recall_queries, args.seed + 2)])
    exact = exact_topk(paths["old"], np.concatenate([recall_q, valid_q]), K)  # one scan for both query sets
    exact_eval, exact_valid = exact[: len(recall_q)], exact[len(recall_q) :]
    nlist = nlist_of(args.index)
    config = RouterConfig(
        name=INDEX_NAME, shards=args.shards, shard_num_cpus=args.shard_cpus, index=IndexConfig(factory=args.index)
    )
    router = create_index(config)
    paced: dict | None = None
    try:
        with PeakMemory() as memory:
            loaded = load_old_table(router, paths["old"], config=LoadConfig(train_sample=args.train_sample))
            nprobe, tried = (
                choose_nprobe(router, valid_q, exact_valid, nlist) if args.nprobe is None else (args.nprobe, {})
            )
            params = {"nprobe": nprobe} if nprobe is not None else None
            served = get(router.search.remote(recall_q, None, K, Strategy.OLD, params))
            timed_queries(router, queries[: bench_index.WARMUP_PROBES], params=params)
            idle = timed_queries(router, queries, params=params)
            summary, backfill_s, live, loadavg, windows = backfill_under_probes(
                router, transform_path(paths, INDEX_NAME, train_sample=args.train_sample), queries, params
            )
        counts = get(router.progress.remote()).counts
        if args.paced_rate:
            get(router.rollback.remote())  # every item back to the old space: the same backfill again, paced
            paced_config = transform_path(
                {**paths, "out": paths["out"] + "-paced"}, INDEX_NAME, train_sample=args.train_sample,
                max_rate=args.paced_rate,
            )  # fmt: skip
            _, paced_s, paced_live, _, paced_windows = backfill_under_probes(router, paced_config, queries, params)
            paced_ms = bench_index.percentiles_ms(paced_live)
            paced = {
                "max_rate": args.paced_rate,
                "seconds": paced_s,
                "items_per_s": n / paced_s,
                "during_backfill": {**paced_ms, "queries": len(paced_live)},
                "windows": paced_windows,
            }
        get(router.rollback.remote())  # and once more, alone: no probes, no pace
        alone_config = transform_path(
            {**paths, "out": paths["out"] + "-alone"}, INDEX_NAME, train_sample=args.train_sample
        )
        started_alone = time.perf_counter()
        alone_summary = run_backfill(alone_config)
        alone_s = time.perf_counter() - started_alone
        alone_counts = get(router.progress.remote()).counts
    finally:
        destroy_index(INDEX_NAME)
    phases = phase_rates(summary)
    for left in (counts, alone_counts):
        if left.get(Space.TRANSFORMED, 0) != n:
            raise RuntimeError(f"the backfill left {left} in the index, expected {n} items transformed")
    idle_ms, live_ms = bench_index.percentiles_ms(idle), bench_index.percentiles_ms(live)
    if paced is not None:
        paced["p99_ratio"] = paced["during_backfill"]["p99_ms"] / idle_ms["p99_ms"]
    return {
        "items": n,
        "write_inputs_seconds": write_s,
        "load_seconds": loaded.seconds,
        "load_items_per_s": n / loaded.seconds,
        "trained_on": loaded.trained_on,
        "backfill_seconds": backfill_s,
        "backfill_items_per_s": n / backfill_s,  # under the probes
        "phases": phases,
        "backfill_alone_seconds": alone_s,
        "backfill_alone_items_per_s": n / alone_s,
        "phases_alone": phase_rates(alone_summary),
        "peak_pss_bytes": memory.peak_pss,
        "peak_pss_gb": memory.peak_pss / 1e9,
        "peak_rss_sum_bytes": memory.peak_rss,
        "peak_processes": memory.peak_processes,
        "peak_pss_by_process": memory.peak_breakdown,
        "nprobe": nprobe,
        "nprobe_validation_recall": {str(k): v for k, v in tried.items()},
        "idle": {**idle_ms, "queries": len(idle)},
        "during_backfill": {**live_ms, "queries": len(live), "windows": windows},
        "p99_ratio": live_ms["p99_ms"] / idle_ms["p99_ms"],
        "paced": paced,
        "p99_ratio_paced": paced["p99_ratio"] if paced else None,
        "recall_at_10": recall_at(served.ids, exact_eval),
        "recall_queries": len(recall_q),
        "loadavg_start": loadavg[0],
        "loadavg_end": loadavg[1],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a minute)")
    parser.add_argument("--sizes", help=f"comma-separated gallery sizes (default {FULL['sizes']})")
    parser.add_argument("--index", help=f"FAISS factory string of both spaces (default {FULL['index']!r})")
    parser.add_argument(
        "--nprobe", type=int, help="IVF lists searched per query (default: chosen on validation queries)"
    )
    parser.add_argument(
        "--paced-rate",
        type=float,
        help=f"items/s of a second, paced backfill timed under the same probes (default {FULL['paced_rate']:,.0f}; "
        "0 skips it)",
    )
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument(
        "--shard-cpus", type=float, default=0.1, help="CPUs reserved per shard (FAISS uses one thread either way)"
    )
    parser.add_argument("--train-sample", type=int, default=100_000, help="vectors each space is trained on")
    parser.add_argument(
        "--fit-steps", type=int, help=f"training steps of the transformation (default {FULL['fit_steps']})"
    )
    parser.add_argument("--probes", type=int, help="queries timed idle (and cycled during the backfill)")
    parser.add_argument("--recall-queries", type=int, help="queries of the recall figure")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/scale.json")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    sizes = sorted(int(s) for s in str(args.sizes).split(","))
    centres = bench_index.unit_rows(np.random.default_rng(args.seed), CLUSTERS, DIM)
    started = time.time()
    owns_ray = not ray.is_initialized()
    init_ray(num_cpus=args.cpus)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as root:
            points = [scale_point(root, n, args, centres) for n in sizes]
    finally:
        if owns_ray:
            ray.shutdown()
    largest = points[-1]
    result = {
        "benchmark": "scale",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": time.time() - started,
        "config": {**vars(args), "sizes": sizes, "clusters": CLUSTERS, "dim": DIM, "k": K, "strategy": STRATEGY},
        "targets": TARGETS,
        "machine": {**bench_index.machine_info(), "faiss": faiss.__version__},
        "largest": largest,
        "growth": {
            "items": sizes,
            "exponent_load_seconds": loglog_exponent(sizes, [p["load_seconds"] for p in points]),
            "exponent_backfill_seconds": loglog_exponent(sizes, [p["backfill_seconds"] for p in points]),
            "exponent_peak_pss": loglog_exponent(sizes, [p["peak_pss_bytes"] for p in points]),
            "exponent_idle_p50": loglog_exponent(sizes, [p["idle"]["p50_ms"] for p in points]),
        },
        "points": points,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(summary(result))
    print(f"wrote {out}")
    return result


def summary(result: dict) -> str:
    p = result["largest"]
    return (
        f"{p['items']:,} items, {result['config']['index']} on {result['config']['shards']} shards: "
        f"load {p['load_seconds']:.0f} s, backfill alone {p['backfill_alone_items_per_s']:,.0f} items/s "
        f"({p['backfill_items_per_s']:,.0f} under the probes), "
        f"peak PSS {p['peak_pss_gb']:.2f} GB, recall@10 {p['recall_at_10']:.3f}, "
        f"p50/p99 idle {p['idle']['p50_ms']:.1f}/{p['idle']['p99_ms']:.1f} ms, during the backfill "
        f"{p['during_backfill']['p50_ms']:.1f}/{p['during_backfill']['p99_ms']:.1f} ms "
        f"(p99 x{p['p99_ratio']:.2f})"
        + (
            f", paced at {p['paced']['max_rate']:,.0f} items/s: p99 {p['paced']['during_backfill']['p99_ms']:.1f} ms "
            f"(x{p['paced']['p99_ratio']:.2f})"
            if p.get("paced")
            else ""
        )
        + (f", nprobe {p['nprobe']} (chosen on validation queries)" if p.get("nprobe_validation_recall") else "")
    )


if __name__ == "__main__":
    main()
