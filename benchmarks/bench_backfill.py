"""Backfill throughput, side by side in one run: the Ray Data embedding pipeline vs bare torch, and the
instant (transform) phase vs re-embedding.

``embed_pipeline_vs_bare``: the project's path (``read_parquet`` -> decode -> ``map_batches(EmbedRows,
ActorPoolStrategy)`` -> the driver consuming batches, Ray Data limited to ``--cpus`` CPUs) vs bare torch
over the same Parquet table, prepared with the same ``ImagePreprocessing``, the same backbone (``--backbone``)
and batch size.
batch size.
One process with ``--cpus`` torch threads is a weak baseline on few cores (intra-op threading on small
batches scales badly), so the bare side also runs ``--cpus`` processes x 1 thread, each over its share of
the rows; the faster wins and is named in the JSON. Bare workers are started and warmed (model loaded,
one batch run) before the clock starts; the pipeline's time includes starting its actor pool, which is
what ``ratio`` shows. ``ratio_steady`` compares the rates a gallery of millions would see: both sides also
run over a table twice as large, interleaved repeat by repeat (the shared box's speed drifts), and the
pipeline's steady rate is the slope of rows delivered against time over the middle of that run (25% to
90% of the rows, timestamped as batches reach the driver), so neither the actor pool's start nor the
tail counts; the warmed bare side has no start to remove, its rate over the same table is its steady
rate. ``pipeline_startup_seconds`` is the time to the first batch, what the pipeline pays once.

``transform_vs_reembed``: ``transform_embeddings`` (a forward transformation over a stored old-embedding
table, no images read) vs ``embed_gallery`` (the backbone over the images), both end to end with writes,
the same pool; the ratio is of items/s. Both also run over tables twice as large, so ``ratio_steady`` is the
ratio without either pool's start. ``compute_bound_ratio`` is the ceiling no pipeline can beat: bare
transformation items/s (read + forward, warmed, one process) over the bare embedding baseline above. The
ratio is the backbone's cost over the transformation's, so ``--reembed-also`` repeats the re-embedding side
with heavier backbones (default ResNet-18 on fewer images) against the same transform runs.

``plan_storage``: the bytes the priority plan stores for a gallery of real-sized JPEGs (``--plan-images`` at
``--plan-size`` pixels, natural-looking pictures: smooth fields plus grain, quality 90), side by side with what
the former plan stored for the same gallery (every row copied, image bytes included, into its tier's files,
with a rank column: written here in the same run, the same tiers and policy), both as a share of the
gallery's bytes (target < 2 %), with the time each took. ``--plan-only`` runs just this section.

Every figure is the median of ``--repeats``. Writes JSON (default benchmarks/results/bench_backfill.json)
with the machine (cores, torch/faiss/numpy versions, load average at start and end: the box is shared)
and prints a summary. Uses a Ray that is already initialised (or RAY_ADDRESS), else starts one.

    PYTHONPATH=. python benchmarks/bench_backfill.py            # 10k images, 200k embeddings
    PYTHONPATH=. python benchmarks/bench_backfill.py --quick    # 2k images, 20k embeddings, about a minute
    PYTHONPATH=. python benchmarks/bench_backfill.py --plan-only --plan-images 5000   # the plan figure alone
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from raybackfill.data import storage
from raybackfill.data.loading import prepare_rows, read_gallery
from raybackfill.data.preprocessing import ImagePreprocessing
from raybackfill.data.schema import EMBEDDING, ID, IMAGE, embedding_table, vectors_of
from raybackfill.data.synth import synthesize
from raybackfill.embed.pipeline import PoolConfig, embed_gallery, map_embed, plan_inputs, transform_embeddings
from raybackfill.models.artifacts import ModelSpec, load_model, save_model
from raybackfill.models.registry import build_model
from raybackfill.runtime import init_ray
from raybackfill.types import Method, Policy

QUICK = {"images": 2_000, "size": 32, "embeddings": 20_000, "reembed_also": "", "plan_images": 1_000}
# The re-embedding backbone. small_cnn is the cheapest model a backfill would run (so the transform ratio is
# its worst case); resnet18 stands for a production backbone.
BACKBONES = {
    "small_cnn": {"embedding_dim": 128, "num_classes": 10, "width": 32},
    "resnet18": {"embedding_dim": 128, "num_classes": 10, "small_images": True},
}
OLD_DIM = 128
FCT_KWARGS = {"old_dim": OLD_DIM, "new_dim": 128}


def write_inputs(root: str, args: argparse.Namespace) -> dict[str, str]:
    """The image table, the old-embedding table, the backbone and the transformation (random weights)."""
    torch.manual_seed(args.seed)
    paths = {name: os.path.join(root, name) for name in ("images", "images_2x", "old", "old_2x", "backbone", "fct")}
    classes = 10
    most = max([args.images, *(n for _, n in args.reembed_also)])
    images = synthesize(classes=classes, per_class=-(-2 * most // classes), size=args.size, seed=args.seed)
    # Several shards so Ray Data has more than one read unit to spread over the pool; the 2x table has the
    # same shard size, so the difference of the two runs is N more images of the same kind.
    rows_per_shard = max(args.images // 4, 1)
    storage.write_table(images.slice(0, args.images), paths["images"], rows_per_shard=rows_per_shard)
    storage.write_table(images.slice(0, 2 * args.images), paths["images_2x"], rows_per_shard=rows_per_shard)
    for name, n in args.reembed_also:
        for suffix, rows in (("", n), ("_2x", 2 * n)):
            paths[f"images_{name}{suffix}"] = os.path.join(root, f"images_{name}{suffix}")
            storage.write_table(images.slice(0, rows), paths[f"images_{name}{suffix}"], rows_per_shard=max(n // 4, 1))
        paths[f"backbone_{name}"] = os.path.join(root, f"backbone_{name}")
        save_backbone(paths[f"backbone_{name}"], name)
    rng = np.random.default_rng(args.seed)
    old = rng.standard_normal((2 * args.embeddings, OLD_DIM), dtype=np.float32)
    ids = np.arange(2 * args.embeddings, dtype=np.int64)
    table = embedding_table(ids, old, model="old-v1")
    storage.write_table(table.slice(0, args.embeddings), paths["old"], rows_per_shard=args.transform_batch_size)
    storage.write_table(table, paths["old_2x"], rows_per_shard=args.transform_batch_size)
    save_models(paths["backbone"], paths["fct"], args.backbone)
    return paths


def jpeg_gallery(uri: str, images: int, size: int, seed: int, rows_per_shard: int, row_group: int) -> int:
    """A gallery of ``images`` JPEGs (``size`` px, quality 90) in shards of ``rows_per_shard`` rows and row groups
    of ``row_group`` rows; returns its bytes on disk. Each image is a smooth random field (an 8x8 colour grid
    upsampled) plus grain, so it compresses like a photo, not like a flat synthetic picture."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from raybackfill.data.schema import image_table

    rng = np.random.default_rng(seed)
    for shard, start in enumerate(range(0, images, rows_per_shard)):
        count = min(rows_per_shard, images - start)
        blobs = []
        for _ in range(count):
            coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
                (size, size), Image.Resampling.BICUBIC
            )
            pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3))
            buffer = io.BytesIO()
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
            blobs.append(buffer.getvalue())
        ids = np.arange(start, start + count, dtype=np.int64)
        os.makedirs(uri, exist_ok=True)
        path = os.path.join(uri, storage.shard_name(shard))
        pq.write_table(image_table(ids, blobs, labels=ids % 10), path, row_group_size=row_group)
    return directory_bytes(uri)


def directory_bytes(uri: str) -> int:
    return sum(f.stat().st_size for f in Path(uri).rglob("*") if f.is_file())


def plan_storage(root: str, args: argparse.Namespace) -> dict[str, Any]:
    """The plan's bytes (ids, ranks, locations) vs the former plan's (the gallery rows copied into tiers)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raybackfill.backfill.plan import RANK, PlanConfig, ensure_plan, locate_gallery, plan_layout, score_gallery

    gallery, old, plan_uri = (os.path.join(root, name) for name in ("plan-gallery", "plan-old", "plan"))
    n = args.plan_images
    gallery_bytes = jpeg_gallery(gallery, n, args.plan_size, args.seed, max(n // 8, 1), 1024)
    ids = np.arange(n, dtype=np.int64)
    vectors = np.random.default_rng(args.seed).standard_normal((n, OLD_DIM), dtype=np.float32)
    storage.write_table(embedding_table(ids, vectors, model="old-v1"), old, rows_per_shard=max(n // 8, 1))
    config = PlanConfig(gallery=gallery, old_embeddings=old, policy=Policy.RANDOM, tiers=8, seed=args.seed)
    new_seconds, copy_seconds, copy_bytes = [], [], []
    for repeat in range(args.repeats):
        uri = f"{plan_uri}-{repeat}"
        start = time.perf_counter()
        plan = ensure_plan(config, uri, os.path.join(root, f"plan-quarantine-{repeat}"))
        new_seconds.append(time.perf_counter() - start)
        # The former plan: the same tiers, every gallery row (image bytes included) copied with its rank.
        start = time.perf_counter()
        scored_ids, scores = score_gallery(config)
        layout = plan_layout(scored_ids, scores, locate_gallery(gallery), config.tiers, None)
        rows = storage.read_table(gallery)
        by_id = np.argsort(rows.column(ID).to_numpy())
        copied = rows.take(pa.array(by_id[layout.column(ID).to_numpy()]))
        copied = copied.append_column(RANK, layout.column(RANK)).append_column("tier", layout.column("tier"))
        copy_dir = os.path.join(root, f"copy-{repeat}")
        for t in range(config.tiers):
            tier_rows = copied.filter(pa.compute.equal(copied.column("tier"), t)).drop_columns(["tier"])
            os.makedirs(os.path.join(copy_dir, f"tier-{t:05d}"), exist_ok=True)
            pq.write_table(tier_rows, os.path.join(copy_dir, f"tier-{t:05d}", "part-00000.parquet"))
        copy_seconds.append(time.perf_counter() - start)
        copy_bytes.append(directory_bytes(copy_dir))
    plan_bytes = directory_bytes(f"{plan_uri}-0")
    return {
        "what": f"policy random, {config.tiers} tiers, over {n} {args.plan_size}x{args.plan_size} JPEGs "
        f"(quality 90) in 8 files of row groups of 1024 rows; plan: ids, ranks and (file, row group, row); "
        "former plan: the gallery rows with a rank column in one file per tier; plan_seconds include the Ray "
        "tasks that locate the ids and the scoring pass, former_plan_seconds a driver-side copy (the former "
        "code ran the copy as a Ray Data pass)",
        "gallery_bytes": gallery_bytes,
        "gallery_bytes_per_image": gallery_bytes / n,
        "plan_bytes": plan_bytes,
        "plan_bytes_per_item": plan_bytes / n,
        "plan_fraction": plan_bytes / gallery_bytes,
        "target_fraction": 0.02,
        "former_plan_bytes": statistics.median(copy_bytes),
        "former_plan_fraction": statistics.median(copy_bytes) / gallery_bytes,
        "ratio_plan_to_former": plan_bytes / statistics.median(copy_bytes),
        "plan_seconds": new_seconds,
        "former_plan_seconds": copy_seconds,
        "planned_items": plan.total,
    }


def save_backbone(uri: str, backbone: str) -> None:
    """A re-embedding backbone, random weights (speed only)."""
    kwargs = BACKBONES[backbone]
    save_model(build_model(backbone, **kwargs), uri, ModelSpec(backbone, "new-v2", kwargs))


def save_models(backbone_uri: str, fct_uri: str, backbone: str = "small_cnn") -> None:
    """The new backbone and the forward transformation, random weights (speed only)."""
    save_backbone(backbone_uri, backbone)
    fct = build_model("forward_transformation", **FCT_KWARGS)
    save_model(fct, fct_uri, ModelSpec("forward_transformation", "fct-v2", FCT_KWARGS, method=Method.FCT))


# --- the bare side: plain torch, no Ray -------------------------------------------------------------------


def bare_embed(model: torch.nn.Module, images_uri: str, size: int, batch_size: int, part: int, parts: int) -> int:
    """Read the table, keep this part's contiguous rows, decode and embed them batch by batch; returns rows."""
    column = storage.read_table(images_uri, columns=[IMAGE]).column(IMAGE)
    lo, hi = len(column) * part // parts, len(column) * (part + 1) // parts
    rows = 0
    with torch.inference_mode():
        for start in range(lo, hi, batch_size):
            pixels = (
                ImagePreprocessing(crop=size)
                .prepare(column.slice(start, min(batch_size, hi - start)).to_pylist())
                .values
            )
            rows += len(model.embed(torch.from_numpy(pixels)))  # type: ignore[operator]  # torch: Module.__getattr__
    return rows


def bare_one_process(images_uri: str, model_uri: str, size: int, batch_size: int, threads: int) -> float:
    """Seconds for this process, ``threads`` torch threads, over all rows (model loaded and warmed first)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = load_model(model_uri).module.eval()
        with torch.inference_mode():
            model.embed(torch.zeros((batch_size, 3, size, size)))  # type: ignore[operator]  # torch: Module.__getattr__
        start = time.perf_counter()
        bare_embed(model, images_uri, size, batch_size, 0, 1)
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)


def bare_processes(images_uri: str, model_uri: str, size: int, batch_size: int, procs: int, repeats: int) -> list:
    """Seconds per repeat for ``procs`` worker processes x 1 thread, each over its share of the rows.

    Workers are this file run with ``--bare-worker``: they load the model, warm up, say ``ready``, then
    run their share each time the parent writes ``go`` (plain pipes: nothing to pickle, no fork of a Ray
    driver). A repeat ends when the last worker reports.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path])}
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--bare-worker",
                images_uri,
                model_uri,
                str(size),
                str(batch_size),
                str(part),
                str(procs),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for part in range(procs)
    ]
    try:
        for w in workers:
            assert w.stdout is not None  # a pipe
            if w.stdout.readline().strip() != "ready":
                raise RuntimeError(f"bare worker {w.pid} failed to start (exit {w.poll()})")
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            for w in workers:
                assert w.stdin is not None  # a pipe
                w.stdin.write("go\n")
                w.stdin.flush()
            for w in workers:
                assert w.stdout is not None  # a pipe
                if not w.stdout.readline().strip().isdigit():
                    raise RuntimeError(f"bare worker {w.pid} failed (exit {w.poll()})")
            seconds.append(time.perf_counter() - start)
        return seconds
    finally:
        for w in workers:
            assert w.stdin is not None  # a pipe
            w.stdin.close()
            w.wait(timeout=60)


def bare_worker(argv: list[str]) -> None:
    images_uri, model_uri, size, batch_size, part, parts = argv
    torch.set_num_threads(1)
    model = load_model(model_uri).module.eval()
    with torch.inference_mode():
        model.embed(torch.zeros((int(batch_size), 3, int(size), int(size))))  # type: ignore[operator]  # torch: Module.__getattr__
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "go":
            print(bare_embed(model, images_uri, int(size), int(batch_size), int(part), int(parts)), flush=True)


def bare_transform(old_uri: str, fct_uri: str, batch_size: int, threads: int) -> float:
    """Seconds for this process (``threads`` torch threads) to read the old-embedding table and transform every
    row (model loaded and warmed first): the compute the transform path cannot avoid, without writes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = load_model(fct_uri).module.eval()
        with torch.inference_mode():
            model(torch.zeros((batch_size, OLD_DIM)))
            start = time.perf_counter()
            old = torch.from_numpy(vectors_of(storage.read_table(old_uri, columns=[EMBEDDING])))
            for begin in range(0, len(old), batch_size):
                model(old[begin : begin + batch_size])
            return time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)


# --- the project's side ------------------------------------------------------------------------------------


def pipeline_embed(images_uri: str, model_uri: str, size: int, pool: PoolConfig) -> tuple[float, float, float]:
    """One run of read -> decode -> EmbedRows actor pool -> the driver consuming batches (what the backfill
    sink sees): seconds end to end, seconds to the first batch, and the steady rate (rows/s, the slope of
    rows delivered against time between 25% and 90% of the rows)."""
    start = time.perf_counter()
    images = read_gallery(images_uri, columns=[ID, IMAGE], rows_per_block=pool.batch_size)
    inputs = plan_inputs({EMBEDDING: model_uri}, images_uri)
    ds = prepare_rows(images, inputs.preprocessing, batch_size=pool.batch_size, num_cpus=pool.cpus_per_actor)
    ds = map_embed(ds, inputs, pool)
    arrivals: list[float] = []
    delivered: list[int] = []
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        arrivals.append(time.perf_counter() - start)
        delivered.append(len(batch[EMBEDDING]) + (delivered[-1] if delivered else 0))
    return arrivals[-1], arrivals[0], middle_slope(np.array(arrivals), np.array(delivered))


def middle_slope(seconds: np.ndarray, delivered: np.ndarray, lo: float = 0.25, hi: float = 0.9) -> float:
    """Least-squares rows/s over the batches that arrived between ``lo`` and ``hi`` of the rows: the pool's
    start and the draining tail fall outside. Needs at least two batches in the window."""
    window = (delivered >= lo * delivered[-1]) & (delivered <= hi * delivered[-1])
    if window.sum() < 2:
        raise ValueError(f"too few batches ({len(delivered)}) for a steady rate; use more images or smaller batches")
    return float(np.polyfit(seconds[window], delivered[window], 1)[0])


def median_rate(items: int, seconds: list[float]) -> float:
    return items / statistics.median(seconds)


def steady_rate(items: int, seconds: list[float], seconds_2x: list[float]) -> float | None:
    """Items/s of the extra ``items`` of the 2x run: fixed costs cancel. None if noise made it non-positive."""
    extra = statistics.median(seconds_2x) - statistics.median(seconds)
    return items / extra if extra > 0 else None


def transform_ratios(
    transform_rate: float, transform_steady: float | None, images: int, seconds: list[float], seconds_2x: list[float]
) -> dict:
    """Transform vs one backbone's re-embedding: end to end, and in steady state when both sides have one."""
    reembed_rate, reembed_steady = median_rate(images, seconds), steady_rate(images, seconds, seconds_2x)
    return {
        "ratio": transform_rate / reembed_rate,
        "ratio_steady": transform_steady / reembed_steady if transform_steady and reembed_steady else None,
        "transform_items_per_s": transform_rate,
        "transform_steady_items_per_s": transform_steady,
        "reembed_images": images,
        "reembed_items_per_s": reembed_rate,
        "reembed_steady_items_per_s": reembed_steady,
        "reembed_seconds": seconds,
        "reembed_seconds_2x": seconds_2x,
    }


def backbone_sizes(text: str) -> list[tuple[str, int]]:
    """``resnet18:1000,...`` -> [("resnet18", 1000), ...]; '' -> []."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, count = item.partition(":")
        if name not in BACKBONES or not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(
                f"expected BACKBONE:IMAGES with BACKBONE in {sorted(BACKBONES)}, got {item!r}"
            )
        pairs.append((name, int(count)))
    return pairs


def machine_info() -> dict:
    import faiss

    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_parallel": torch.__config__.parallel_info().splitlines()[:4],
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "ray": ray.__version__,
    }


def main(argv: list[str] | None = None) -> dict:
    load_start = os.getloadavg()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000, help="images embedded (default 10k)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--embeddings", type=int, default=200_000, help="stored old embeddings (default 200k)")
    parser.add_argument(
        "--backbone",
        choices=sorted(BACKBONES),
        default="small_cnn",
        help="the re-embedding backbone (default small_cnn, the cheapest: worst case for the ratio)",
    )
    parser.add_argument(
        "--reembed-also",
        type=backbone_sizes,
        default="resnet18:1000",
        help="heavier backbones for transform_vs_reembed, as NAME:IMAGES,... ('' for none)",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--transform-batch-size", type=int, default=8192)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="total threads, both sides")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/bench_backfill.json")
    parser.add_argument("--plan-images", type=int, default=20_000, help="JPEGs of the plan_storage gallery")
    parser.add_argument("--plan-size", type=int, default=64, help="side of the plan_storage JPEGs (default 64)")
    parser.add_argument("--plan-only", action="store_true", help="run only the plan_storage section")
    parser.add_argument(
        "--quick", action="store_true", help=f"small run for a smoke test: defaults {QUICK} (explicit flags still win)"
    )
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.cpus < 1:
        parser.error("--repeats and --cpus must be at least 1")
    args.reembed_also = [(name, count) for name, count in args.reembed_also if name != args.backbone]

    owns_ray = not ray.is_initialized()
    init_ray(num_cpus=args.cpus)
    context = ray.data.DataContext.get_current()
    previous_limits = context.execution_options.resource_limits
    # One actor (1 torch thread, half a CPU) per CPU of the budget; decode tasks take the other halves.
    pool = PoolConfig(actors=args.cpus, cpus_per_actor=0.5, gpus_per_actor=0.0, batch_size=args.batch_size)
    transform_pool = PoolConfig(
        actors=args.cpus, cpus_per_actor=0.5, gpus_per_actor=0.0, batch_size=args.transform_batch_size
    )
    if args.plan_only:
        try:
            with tempfile.TemporaryDirectory(prefix="bench-plan-") as root:
                return write_plan_only(args, plan_storage(root, args), load_start)
        finally:
            if owns_ray:
                ray.shutdown()
    with tempfile.TemporaryDirectory(prefix="bench-backfill-") as root:
        try:
            context.execution_options.resource_limits = previous_limits.copy(cpu=args.cpus)
            plan_figures = plan_storage(root, args)
            paths = write_inputs(root, args)
            n = args.images

            bare_one = [
                bare_one_process(paths["images"], paths["backbone"], args.size, args.batch_size, args.cpus)
                for _ in range(args.repeats)
            ]
            bare = {f"1 process x {args.cpus} threads": bare_one}
            if args.cpus > 1:
                bare[f"{args.cpus} processes x 1 thread"] = bare_processes(
                    paths["images"], paths["backbone"], args.size, args.batch_size, args.cpus, args.repeats
                )
            best_bare = min(bare, key=lambda name: statistics.median(bare[name]))
            pipe = [pipeline_embed(paths["images"], paths["backbone"], args.size, pool)[0] for _ in range(args.repeats)]
            bare_2x, pipe_2x = [], []
            for _ in range(args.repeats):  # interleaved: the box's speed drifts between minutes
                bare_2x.append(
                    bare_processes(paths["images_2x"], paths["backbone"], args.size, args.batch_size, args.cpus, 1)[0]
                    if best_bare != next(iter(bare))
                    else bare_one_process(paths["images_2x"], paths["backbone"], args.size, args.batch_size, args.cpus)
                )
                pipe_2x.append(pipeline_embed(paths["images_2x"], paths["backbone"], args.size, pool))

            outputs = iter(os.path.join(root, f"out-{i}") for i in itertools.count())

            def transform_seconds(old_uri: str) -> float:
                start = time.perf_counter()
                transform_embeddings(old_uri, paths["fct"], next(outputs), pool=transform_pool, progress=False)
                return time.perf_counter() - start

            def reembed_seconds(images_uri: str, backbone_uri: str) -> float:
                start = time.perf_counter()
                embed_gallery(images_uri, {EMBEDDING: backbone_uri}, next(outputs), pool=pool, progress=False)
                return time.perf_counter() - start

            bare_transform_s = [
                bare_transform(paths["old"], paths["fct"], args.transform_batch_size, args.cpus)
                for _ in range(args.repeats)
            ]
            transform_s = [transform_seconds(paths["old"]) for _ in range(args.repeats)]
            transform_2x = [transform_seconds(paths["old_2x"]) for _ in range(args.repeats)]
            reembed = {
                args.backbone: (
                    n,
                    [reembed_seconds(paths["images"], paths["backbone"]) for _ in range(args.repeats)],
                    [reembed_seconds(paths["images_2x"], paths["backbone"]) for _ in range(args.repeats)],
                )
            }
            for name, count in args.reembed_also:
                reembed[name] = (
                    count,
                    [reembed_seconds(paths[f"images_{name}"], paths[f"backbone_{name}"]) for _ in range(args.repeats)],
                    [
                        reembed_seconds(paths[f"images_{name}_2x"], paths[f"backbone_{name}"])
                        for _ in range(args.repeats)
                    ],
                )
        finally:
            context.execution_options.resource_limits = previous_limits
            if owns_ray:
                ray.shutdown()

    bare_rates = {name: median_rate(n, seconds) for name, seconds in bare.items()}
    best = best_bare
    pipe_rate = median_rate(n, pipe)
    pipe_steady = statistics.median(rate for _, _, rate in pipe_2x)
    bare_steady = median_rate(2 * n, bare_2x)
    steady_ratio = pipe_steady / bare_steady
    transform_rate = median_rate(args.embeddings, transform_s)
    transform_steady = steady_rate(args.embeddings, transform_s, transform_2x)
    by_backbone = {
        name: transform_ratios(transform_rate, transform_steady, count, seconds, seconds_2x)
        for name, (count, seconds, seconds_2x) in reembed.items()
    }
    bare_transform_rate = median_rate(args.embeddings, bare_transform_s)
    load_end = os.getloadavg()

    result: dict[str, Any] = {
        "benchmark": "bench_backfill",
        "config": vars(args),
        "machine": {**machine_info(), "loadavg_start": load_start, "loadavg_end": load_end},
        "embed_pipeline_vs_bare": {
            "what": f"{args.backbone} {BACKBONES[args.backbone]} on {n} {args.size}x{args.size} PNGs, "
            f"batch {args.batch_size}, "
            f"{args.cpus} CPUs per side; pipeline: {pool.actors} EmbedRows actors x 1 thread "
            f"({pool.cpus_per_actor} CPU each), Ray Data CPU limit {args.cpus}, driver consumes batches; "
            "bare: warmed workers, read Parquet + ImagePreprocessing.prepare + embed",
            "ratio": pipe_rate / bare_rates[best],
            "target": 0.8,
            "pipeline_items_per_s": pipe_rate,
            # Over the middle of the 2N runs: the pool's start (worker processes, torch import, model load) is
            # outside the window. A gallery of millions pays that start once; a benchmark of thousands pays it
            # in full, which is what "ratio" shows.
            "ratio_steady": steady_ratio,
            "pipeline_steady_items_per_s": pipe_steady,
            "bare_steady_items_per_s": bare_steady,
            "pipeline_startup_seconds": statistics.median(first for _, first, _ in pipe_2x),
            "pipeline_seconds": pipe,
            "pipeline_seconds_2x": [seconds for seconds, _, _ in pipe_2x],
            "pipeline_steady_items_per_s_2x": [rate for _, _, rate in pipe_2x],
            "bare_seconds_2x": bare_2x,
            "baseline": best,
            "bare_items_per_s": bare_rates[best],
            "bare_items_per_s_by_config": bare_rates,
            "bare_seconds_by_config": bare,
        },
        "transform_vs_reembed": {
            "what": f"transform_embeddings of {args.embeddings} stored {OLD_DIM}-d embeddings through "
            f"forward_transformation {FCT_KWARGS} vs embed_gallery of {n} images with {args.backbone}; "
            f"both end to end with writes, {args.cpus} actors x 0.5 CPU; by_backbone: the same transform "
            "runs against other backbones' re-embedding",
            **by_backbone[args.backbone],
            "target": 50.0,
            "compute_bound_ratio": bare_transform_rate / bare_rates[best],
            "bare_transform_items_per_s": bare_transform_rate,
            "bare_transform_seconds": bare_transform_s,
            "transform_seconds": transform_s,
            "transform_seconds_2x": transform_2x,
            "by_backbone": by_backbone,
        },
        "plan_storage": plan_figures,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    embed = result["embed_pipeline_vs_bare"]
    for name, rate in bare_rates.items():
        print(f"bare {name}: {rate:,.0f} img/s")
    steady_text = (
        f"steady state {pipe_steady:,.0f} vs {bare_steady:,.0f} img/s = {steady_ratio:.2f}, "
        f"first batch after {embed['pipeline_startup_seconds']:.1f} s"
    )
    print(
        f"pipeline: {pipe_rate:,.0f} img/s end to end, ratio to best bare ({best}) {embed['ratio']:.2f}; "
        f"{steady_text} (target >= 0.8)"
    )
    for name, figures in by_backbone.items():
        steady = figures["ratio_steady"]
        print(
            f"transform vs re-embed with {name}: {figures['transform_items_per_s']:,.0f} vs "
            f"{figures['reembed_items_per_s']:,.0f} items/s = {figures['ratio']:.1f}x end to end, "
            + ("steady state lost in noise" if steady is None else f"{steady:.1f}x in steady state")
            + " (target >= 50)"
        )
    print(
        f"compute bound with {args.backbone}: bare transform {bare_transform_rate:,.0f} items/s vs bare embed "
        f"{bare_rates[best]:,.0f} img/s = {result['transform_vs_reembed']['compute_bound_ratio']:.1f}x"
    )
    print_plan(plan_figures)
    print(f"load average {load_start[0]:.1f} -> {load_end[0]:.1f} on {os.cpu_count()} cores; wrote {out}")
    return result


def print_plan(figures: dict[str, Any]) -> None:
    print(
        f"plan storage: {figures['plan_bytes']:,} bytes ({figures['plan_bytes_per_item']:.1f} B/item) = "
        f"{100 * figures['plan_fraction']:.2f}% of the gallery's {figures['gallery_bytes']:,} bytes "
        f"({figures['gallery_bytes_per_image']:,.0f} B/image; target < 2%); the former copy of the rows: "
        f"{100 * figures['former_plan_fraction']:.1f}% (plan/former = {figures['ratio_plan_to_former']:.4f})"
    )


def write_plan_only(args: argparse.Namespace, figures: dict[str, Any], load_start) -> dict:
    """The JSON of a ``--plan-only`` run (its own file next to the full run's)."""
    result = {
        "benchmark": "bench_backfill",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": vars(args),
        "machine": {**machine_info(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "plan_storage": figures,
    }
    out = Path(args.out)
    out = out.with_name(out.stem + "_plan" + out.suffix)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_plan(figures)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bare-worker"]:
        bare_worker(sys.argv[2:])
    else:
        main()
