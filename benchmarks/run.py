"""The benchmark suite: every side-by-side figure of the project in one run, written as one JSON file.

    python -m benchmarks.run --out results.json            # full: 10k images, 1M-item index, 100k/300k/1M growth
    python -m benchmarks.run --quick --out results.json    # a few minutes: the same keys at small sizes
    raybackfill bench --quick --out results.json           # the same, from the CLI

One Ray (started here with ``--cpus`` CPUs unless one is already initialised) serves every benchmark, so the
project's path and its bare baseline always run in the same process and the same minutes:

- ``embed_pipeline_vs_bare`` and ``transform_vs_reembed`` come from benchmarks/bench_backfill.py;
- ``merged_query_vs_bare_faiss`` and ``p99_live_vs_idle`` come from benchmarks/bench_index.py;
- ``index_kinds`` comes from ``bench_index.py kinds``: recall@10, QPS and bytes per item of each FAISS index kind
  (factory string) through the router, next to a bare FAISS index of the same string and parameters;
- ``growth`` runs the backfill through the transform path (plan, instant phase into a live index that already
  serves the old gallery; ``budget=0``, so no image is re-embedded) at each of ``--sizes``, then times single
  queries against the index; it fits log(time) = a + b log(n) and reports the exponents b;
- ``scale_1m`` is the largest growth point (1M items in a full run): wall time, items/s and the peak memory of
  every Ray process together (this process and its descendants: GCS, raylet, workers, actors), as the sum of
  RSS and as the sum of PSS (shared object-store pages counted once).

Every entry carries the load average before and after it: the box may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from benchmarks import bench_backfill, bench_index
from raybackfill.backfill.run import BackfillConfig, BackfillSummary, run_backfill
from raybackfill.data import storage
from raybackfill.data.images import encode_png
from raybackfill.data.schema import ID, IMAGE, embedding_table
from raybackfill.embed.pipeline import PoolConfig
from raybackfill.index.router import RouterConfig, create_index, destroy_index, get
from raybackfill.runtime import init_ray
from raybackfill.types import Method, Policy

FULL_SIZES = (100_000, 300_000, 1_000_000)
QUICK_SIZES = (10_000, 30_000, 100_000)
SCALE_INDEX = "bench-scale"
SCALE_ROWS_PER_SHARD = 65_536
SCALE_PROBES = 200
TARGETS = {
    "embed_pipeline_vs_bare": ">= 0.8",
    "transform_vs_reembed": ">= 50",
    "merged_query_vs_bare_faiss": ">= 0.7",
    "p99_live_vs_idle": "<= 2.0",
    "scale_1m": "< 8 GB (PSS of all Ray processes) at >= 20k items/s",
}


def process_tree(root: int) -> list[int]:
    """``root`` and every descendant pid, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:  # the process ended meanwhile
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])  # after "pid (comm) state"
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


PSS_KINDS = ("Pss_Anon", "Pss_Shmem", "Pss_File")  # a process's PSS by kind of page (Linux 5.8+)


def memory_fields(pid: int) -> dict[str, int]:
    """The byte counts of /proc/PID/smaps_rollup (Rss, Pss, Pss_Anon, ...); empty if the process ended meanwhile."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return {}
    return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines[1:] if line.endswith("kB")}


def process_name(pid: int) -> str:
    """A process's command line, cut short (a Ray worker's reads ``ray::ActorName.method``)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    return " ".join(a.decode(errors="replace") for a in argv if a)[:80] or "?"


class PeakMemory:
    """Samples the memory of this process and all its descendants in a thread; keeps the peaks (bytes).

    When this process started Ray, its descendants are the whole local cluster (GCS, raylet, workers,
    actors). RSS counts a shared page (the object store is shared memory) once per process that touched it,
    so the RSS sum over-counts; PSS splits each shared page between its users, so the PSS sum is the memory
    the processes take together. Linux only (/proc).
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.peak_rss = self.peak_pss = self.peak_processes = 0
        self.peak_breakdown: list[dict] = []  # the processes behind the PSS peak, largest first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def sample(self) -> None:
        pids = process_tree(os.getpid())
        usage = [memory_fields(pid) for pid in pids]
        rss, pss = sum(u.get("Rss", 0) for u in usage), sum(u.get("Pss", 0) for u in usage)
        if pss > self.peak_pss:
            # Anonymous pages are a process's own heap; shmem pages are the object store's (shared memory)
            by_name: dict[str, list[dict[str, int]]] = {}
            for pid, fields in zip(pids, usage, strict=True):
                by_name.setdefault(process_name(pid), []).append(fields)
            self.peak_breakdown = sorted(
                (
                    {
                        "process": name,
                        "count": len(rows),
                        "pss_bytes": sum(r.get("Pss", 0) for r in rows),
                        **{f"{kind.lower()}_bytes": sum(r.get(kind, 0) for r in rows) for kind in PSS_KINDS},
                    }
                    for name, rows in by_name.items()
                ),
                key=lambda row: -row["pss_bytes"],
            )
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_processes = max(self.peak_processes, len(pids))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PeakMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def loglog_exponent(sizes: list[int], values: list[float]) -> float:
    """b of the least-squares fit log(value) = a + b log(size): 1.0 is linear growth, 0.0 is flat."""
    slope, _ = np.polyfit(np.log(np.asarray(sizes, dtype=float)), np.log(np.asarray(values, dtype=float)), 1)
    return float(slope)


def write_scale_inputs(root: str, n: int, seed: int) -> tuple[dict[str, str], np.ndarray]:
    """(paths, the old vectors) of a gallery of ``n`` ids (every image the same tiny PNG: the transform path
    reads no pixels, only the plan copies the bytes), their stored old embeddings, the new backbone and the
    forward transformation."""
    paths = {name: os.path.join(root, name) for name in ("gallery", "old", "backbone", "fct", "out")}
    ids = np.arange(n, dtype=np.int64)
    png = pa.array([encode_png(np.zeros((8, 8, 3), dtype=np.uint8))], type=pa.binary())
    gallery = pa.table({ID: pa.array(ids), IMAGE: png.take(pa.array(np.zeros(n, dtype=np.int64)))})
    storage.write_table(gallery, paths["gallery"], rows_per_shard=SCALE_ROWS_PER_SHARD)
    rng = np.random.default_rng(seed)
    old = bench_index.unit_rows(rng, n, bench_backfill.OLD_DIM)
    storage.write_table(embedding_table(ids, old, model="old-v1"), paths["old"], rows_per_shard=SCALE_ROWS_PER_SHARD)
    bench_backfill.save_models(paths["backbone"], paths["fct"])
    return paths, old


def phase_rates(summary: BackfillSummary) -> dict[str, dict[str, float]]:
    """Items, seconds and items/s of each phase of a finished backfill, by phase name."""
    return {p.name: {"items": p.items, "seconds": p.seconds, "items_per_s": p.rate} for p in summary.phases}


def transform_path(paths: dict[str, str], index: str, **overrides) -> BackfillConfig:
    """The backfill the scale benchmarks time: through the forward transformation only (plan by id, budget 0:
    no image is re-embedded), one transformation actor, into the live index ``index``."""
    return BackfillConfig(
        gallery=paths["gallery"],
        old_embeddings=paths["old"],
        upgrade=paths["backbone"],
        out=paths["out"],
        method=Method.FCT,
        transformation=paths["fct"],
        policy=Policy.ID,
        budget=0,
        index=index,
        pool=PoolConfig(actors=1, cpus_per_actor=0.5, gpus_per_actor=0.0),
        progress=False,
        **overrides,
    )


def scale_point(root: str, n: int, probes: int, seed: int) -> dict:
    """One backfill of ``n`` items through the transform path into a live index, then single-query latency."""
    paths, old = write_scale_inputs(os.path.join(root, f"scale-{n}"), n, seed)
    ids = np.arange(n, dtype=np.int64)
    config = RouterConfig(name=SCALE_INDEX, shards=2, shard_num_cpus=0.25)
    router = create_index(config)
    try:
        start = time.perf_counter()
        for lo in range(0, n, bench_index.CHUNK):
            get(router.load_old.remote(ids[lo : lo + bench_index.CHUNK], old[lo : lo + bench_index.CHUNK], "v1"))
        load_s = time.perf_counter() - start
        del old
        backfill = transform_path(paths, SCALE_INDEX)
        loadavg_start = os.getloadavg()
        with PeakMemory() as memory:
            start = time.perf_counter()
            summary = run_backfill(backfill)
            wall_s = time.perf_counter() - start
        loadavg_end = os.getloadavg()
        phases = phase_rates(summary)
        if phases.get("instant", {}).get("items") != n:
            raise RuntimeError(f"the instant phase moved {phases.get('instant')} items, expected {n}")
        rng = np.random.default_rng(seed + 1)
        q_old, q_new = (bench_index.unit_rows(rng, probes + bench_index.WARMUP_PROBES, 128) for _ in range(2))
        bench_index.probe_latency(router, q_old[: bench_index.WARMUP_PROBES], q_new[: bench_index.WARMUP_PROBES])
        latency = bench_index.probe_latency(
            router, q_old[bench_index.WARMUP_PROBES :], q_new[bench_index.WARMUP_PROBES :]
        )
    finally:
        destroy_index(SCALE_INDEX)
    return {
        "items": n,
        "wall_seconds": wall_s,
        "items_per_s": n / wall_s,
        "phases": phases,
        "index_load_old_seconds": load_s,
        "peak_pss_bytes": memory.peak_pss,
        "peak_rss_sum_bytes": memory.peak_rss,
        "peak_processes": memory.peak_processes,
        "query": {
            "strategy": bench_index.LATENCY_STRATEGY,
            "k": bench_index.LATENCY_K,
            "probes": probes,
            **bench_index.percentiles_ms(latency),
        },
        "loadavg_start": loadavg_start,
        "loadavg_end": loadavg_end,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The suite's arguments, shared by ``python -m benchmarks.run`` and ``raybackfill bench``."""
    parser.add_argument("--quick", action="store_true", help="small sizes, a few minutes (CI)")
    parser.add_argument("--out", default="benchmarks/results/results.json", help="the JSON file to write")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="total threads, every side")
    parser.add_argument("--repeats", type=int, help="repeats per ratio (default 3, quick 2)")
    parser.add_argument("--sizes", help=f"comma-separated growth sizes (default {FULL_SIZES}, quick {QUICK_SIZES})")
    parser.add_argument("--images", type=int, help="images for the embedding benchmarks (bench_backfill's default)")
    parser.add_argument("--batch-size", type=int, help="images per embedding batch (bench_backfill's default)")
    parser.add_argument("--embeddings", type=int, help="stored embeddings for the transform benchmark")
    parser.add_argument("--index-n", type=int, help="gallery of the query benchmarks (bench_index's default)")
    parser.add_argument("--probes", type=int, help=f"single queries per latency figure (default {SCALE_PROBES})")
    parser.add_argument("--kinds-n", type=int, help="gallery of the index-kind benchmark (bench_index kinds' default)")
    parser.add_argument("--factories", help="';'-separated FAISS factory strings of the index-kind benchmark")
    parser.add_argument("--seed", type=int, default=0)


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on --quick; check the sizes."""
    args.repeats = args.repeats or (2 if args.quick else 3)
    sizes = args.sizes.split(",") if isinstance(args.sizes, str) else (QUICK_SIZES if args.quick else FULL_SIZES)
    args.sizes = sorted(int(s) for s in sizes)
    if len(args.sizes) < 2 or args.sizes[0] < 1:
        raise ValueError(f"--sizes needs at least two positive sizes for a growth exponent, got {args.sizes}")
    args.probes = args.probes or (50 if args.quick else SCALE_PROBES)
    return args


def sub_argv(args: argparse.Namespace, out: str, **sizes: int | str | None) -> list[str]:
    """Arguments for a sub-benchmark: the shared ones, then any size given here (they beat its --quick)."""
    argv = ["--cpus", str(args.cpus), "--repeats", str(args.repeats), "--seed", str(args.seed), "--out", out]
    argv += ["--quick"] if args.quick else []
    for flag, value in sizes.items():
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    return argv


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> dict:
    """Run every benchmark, write ``args.out`` and return the result."""
    args = resolve_defaults(args)
    started, load_start = time.time(), os.getloadavg()
    owns_ray = not ray.is_initialized()
    init_ray(num_cpus=args.cpus)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-suite-") as root:
            backfill = bench_backfill.main(
                sub_argv(
                    args,
                    os.path.join(root, "backfill.json"),
                    images=args.images,
                    batch_size=args.batch_size,
                    embeddings=args.embeddings,
                )
            )
            index = bench_index.main(
                sub_argv(args, os.path.join(root, "index.json"), n=args.index_n, latency_probes=args.probes)
            )
            kinds = bench_index.kinds_main(
                sub_argv(args, os.path.join(root, "kinds.json"), n=args.kinds_n, factories=args.factories)
            )
            points = [scale_point(root, n, args.probes, args.seed) for n in args.sizes]
    finally:
        if owns_ray:
            ray.shutdown()

    def loads(sub: dict) -> dict:
        return {"loadavg_start": sub["machine"]["loadavg_start"], "loadavg_end": sub["machine"]["loadavg_end"]}

    merged = index["index"]["strategies_at_beta"]
    largest = points[-1]
    result = {
        "suite": "raybackfill benchmarks",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": time.time() - started,
        "config": vars(args),
        "targets": TARGETS,
        "machine": {
            **bench_index.machine_info(),
            **bench_backfill.machine_info(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "embed_pipeline_vs_bare": {**backfill["embed_pipeline_vs_bare"], **loads(backfill)},
        "transform_vs_reembed": {**backfill["transform_vs_reembed"], **loads(backfill)},
        "merged_query_vs_bare_faiss": {
            "what": f"rank_merge top-{index['config']['k']} QPS, {index['config']['queries']} queries per call, "
            f"{index['config']['n']} items over {index['config']['shards']} shards with a fraction "
            f"{index['config']['beta']} backfilled, vs one bare IndexFlatIP holding the old vectors",
            "ratio": merged["rank_merge"]["ratio_to_bare"],
            "target": 0.7,
            "ratio_by_strategy": {name: s["ratio_to_bare"] for name, s in merged.items()},
            "qps": merged["rank_merge"]["qps"],
            "bare_qps": index["baseline"]["qps"],
            "baseline": index["baseline"]["what"],
            **loads(index),
        },
        "p99_live_vs_idle": {
            "what": index["latency"]["what"],
            "ratio": index["latency"]["p99_ratio"],
            "ratio_paced": index["latency"]["p99_ratio_paced"],
            "target": 2.0,
            "idle": index["latency"]["idle"],
            "during_upserts": index["latency"]["during_upserts"],
            "during_paced_upserts": index["latency"]["during_paced_upserts"],
            **loads(index),
        },
        "index_kinds": {
            "what": kinds["what"],
            "target_qps_ratio": 0.9,
            "min_qps_ratio": min(k["qps_ratio"] for k in kinds["kinds"].values()),
            "by_factory": {
                factory: {
                    "recall_at_10": k["index"]["recall_at_10"],
                    "bare_recall_at_10": k["bare"]["recall_at_10"],
                    "qps": k["index"]["qps"],
                    "bare_qps": k["bare"]["qps"],
                    "qps_ratio": k["qps_ratio"],
                    "qps_ratio_rounds": k["qps_ratio_rounds"],
                    "split_qps_ratio": k["split_qps_ratio"],
                    "serving_qps_ratio": k["serving_qps_ratio"],
                    "serving_qps_ratio_rounds": k["serving_qps_ratio_rounds"],
                    "one_space_qps_ratio": k["one_space_qps_ratio"],
                    "one_space_qps_ratio_rounds": k["one_space_qps_ratio_rounds"],
                    "one_space_shards": k["one_space_shards"],
                    "router_qps_ratio": k["router_qps_ratio"],
                    "router_one_space_qps_ratio": k["router_one_space_qps_ratio"],
                    "transform_qps_ratio": k["transform_qps_ratio"],
                    "transform_qps_ratio_rounds": k["transform_qps_ratio_rounds"],
                    "transform_shards": k["transform_shards"],
                    "router_transform_qps_ratio": k["router_transform_qps_ratio"],
                    "transform_recall_at_10": k["transform_recall_at_10"],
                    # a graph kind: the transform path against bare FAISS with the same replaced rows
                    **{key: value for key, value in k.items() if key.startswith(bench_index.REPLACED_PREFIXES)},
                    "shards": k["shards"],
                    "qps_ratio_by_shards": {shards: v["qps_ratio"] for shards, v in k["by_shards"].items()},
                    "bare_parts": k["bare_parts"]["parts"],
                    "bytes_per_item_served": k["index"]["bytes_per_item_served"],
                    "bytes_per_item_held": k["index"]["bytes_per_item_held"],
                    "bare_bytes_per_item": k["bare"]["bytes_per_item"],
                    "search_params": k["search_params"],
                    "build_params": k.get("build_params", {}),
                }
                for factory, k in kinds["kinds"].items()
            },
            **loads(kinds),
        },
        "scale_1m": {
            "what": f"backfill of {largest['items']} items through the transform path (plan by id, instant phase "
            "into a live 2-shard index, budget 0); peak memory of this process and its descendants",
            **largest,
            "peak_pss_gb": largest["peak_pss_bytes"] / 1e9,
            "target_gb": 8.0,
            "target_items_per_s": bench_index.BACKFILL_TARGET_ITEMS_PER_S,
        },
        "growth": {
            "items": [p["items"] for p in points],
            "backfill_seconds": [p["wall_seconds"] for p in points],
            "instant_seconds": [p["phases"]["instant"]["seconds"] for p in points],
            "query_p50_ms": [p["query"]["p50_ms"] for p in points],
            "query_p99_ms": [p["query"]["p99_ms"] for p in points],
            "exponent_backfill_seconds": loglog_exponent(
                [p["items"] for p in points], [p["wall_seconds"] for p in points]
            ),
            "exponent_query_p50": loglog_exponent([p["items"] for p in points], [p["query"]["p50_ms"] for p in points]),
            "points": points,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(summary(result))
    print(f"wrote {out}")
    return result


def summary(result: dict) -> str:
    """The headline figures, one line each."""
    scale, growth = result["scale_1m"], result["growth"]
    lines = [
        f"{key}: {result[key]['ratio']:.2f} (target {TARGETS[key]})"
        for key in ("embed_pipeline_vs_bare", "transform_vs_reembed", "merged_query_vs_bare_faiss", "p99_live_vs_idle")
    ]
    lines[0] += f"; steady state {result['embed_pipeline_vs_bare']['ratio_steady']:.2f}"
    transform = result["transform_vs_reembed"]
    lines[1] += (
        "".join(
            f"; {name} {figures['ratio']:.1f}x"
            + ("" if figures["ratio_steady"] is None else f" ({figures['ratio_steady']:.1f}x steady)")
            for name, figures in transform["by_backbone"].items()
        )
        + f"; compute bound {transform['compute_bound_ratio']:.1f}x"
    )
    paced = result["p99_live_vs_idle"]["during_paced_upserts"]
    lines[3] += (
        f" with upserts as fast as taken; {result['p99_live_vs_idle']['ratio_paced']:.2f} at "
        f"{paced['upserts_per_s']:,.0f} items/s"
    )
    lines += [
        f"index kind {factory}: recall@10 {k['recall_at_10']:.3f} (bare {k['bare_recall_at_10']:.3f}), QPS ratio "
        f"{k['qps_ratio']:.2f} (split {k['split_qps_ratio']:.2f} x serving {k['serving_qps_ratio']:.2f}, "
        f"{k['shards']} shard(s); one space {k['one_space_qps_ratio']:.2f}; transform path "
        f"{k['transform_qps_ratio']:.2f}), "
        f"{k['bytes_per_item_served']:.0f} B/item (bare {k['bare_bytes_per_item']:.0f})"
        for factory, k in result["index_kinds"]["by_factory"].items()
    ]
    lines.append(
        f"scale ({scale['items']:,} items): {scale['wall_seconds']:.1f} s, "
        f"{scale['items_per_s']:,.0f} items/s, peak PSS {scale['peak_pss_gb']:.2f} GB "
        f"(target {TARGETS['scale_1m']})"
    )
    lines.append(
        f"growth {growth['items']}: backfill time ~ n^{growth['exponent_backfill_seconds']:.2f}, "
        f"query p50 ~ n^{growth['exponent_query_p50']:.2f}"
    )
    machine = result["machine"]
    lines.append(
        f"load average {machine['loadavg_start'][0]:.1f} -> {machine['loadavg_end'][0]:.1f} "
        f"on {machine['cpus']} cores, {result['seconds']:.0f} s"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
