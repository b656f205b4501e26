"""`backfill --dry-run` against the real run, side by side in one run: the estimate of each phase's time and
of the bytes written, then the backfill itself (no index) on the same inputs and cluster; ratio = estimate /
real (1.0 is exact; the issue asks for the total within 2x on the demo gallery).

The inputs are the demo's shape: a synthetic gallery of ``--images`` images (``--size`` pixels), old embeddings
of every item by a small CNN, a new small CNN and a FastFill transformation (random weights: time and bytes do
not depend on what the weights learned), method fastfill with the uncertainty order. Each repeat runs the dry run
and the real run into a fresh output, in alternating order; figures are medians of ``--repeats``. Writes JSON (default
benchmarks/results/bench_dry_run.json) with the machine's load average at start and end (the box is shared).

    PYTHONPATH=. python benchmarks/bench_dry_run.py            # 2,100 images: the full demo's gallery
    PYTHONPATH=. python benchmarks/bench_dry_run.py --quick    # 600 images (the quick demo's gallery)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from raybackfill.backfill.estimate import dry_run
from raybackfill.backfill.run import BackfillConfig, run_backfill
from raybackfill.data import storage
from raybackfill.data.synth import write_synthetic
from raybackfill.embed.pipeline import PoolConfig, embed_gallery
from raybackfill.models.artifacts import ModelSpec, save_model
from raybackfill.models.registry import build_model
from raybackfill.runtime import init_ray

QUICK = {"images": 600}


def _save(uri: str, architecture: str, version: str, **kwargs) -> str:
    save_model(build_model(architecture, **kwargs), uri, ModelSpec(architecture, version, kwargs))
    return uri


def write_inputs(root: str, images: int, size: int, seed: int) -> dict[str, str]:
    torch.manual_seed(seed)
    classes = 20
    gallery = os.path.join(root, "gallery")
    write_synthetic(gallery, classes=classes, per_class=max(images // classes, 1), size=size, seed=seed)
    cnn = {"num_classes": classes, "width": 16, "embedding_dim": 64}
    paths = {
        "gallery": gallery,
        "old_model": _save(os.path.join(root, "old"), "small_cnn", "v1", **cnn),
        "new": _save(os.path.join(root, "new"), "small_cnn", "v2", **cnn),
        "ff": _save(os.path.join(root, "ff"), "fastfill_transformation", "ff", old_dim=64, new_dim=64),
        "old": os.path.join(root, "old-emb"),
    }
    embed_gallery(gallery, {"embedding": paths["old_model"]}, paths["old"], progress=False)
    return paths


def _timed(fn, *args):
    started = time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - started


def _bytes_under(uri: str) -> int:
    return sum(p.stat().st_size for p in Path(uri).rglob("*.parquet"))


def main(argv: list[str] | None = None) -> dict:
    load_start = os.getloadavg()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2_100, help="gallery images (default 2100: the demo's)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/bench_dry_run.json")
    parser.add_argument("--quick", action="store_true", help=f"smoke-test size: {QUICK} (explicit flags still win)")
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    init_ray()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-dry-run-") as root:
        paths = write_inputs(root, args.images, args.size, args.seed)
        for repeat in range(args.repeats):
            out = os.path.join(root, f"backfill-{repeat}")
            config = BackfillConfig(
                gallery=paths["gallery"], old_embeddings=paths["old"], upgrade=paths["new"], out=out,
                method="fastfill", transformation=paths["ff"], policy="uncertainty", index=None,
                pool=PoolConfig(batch_size=args.batch_size), progress=False,
            )  # fmt: skip
            # Alternate which runs first: the first one starts Ray's worker processes (imports), the second
            # finds them warm, and a fixed order would favour one side.
            if repeat % 2 == 0:
                report, dry_seconds = _timed(dry_run, config)
                assert not os.path.exists(out), "the dry run wrote its output directory"
                summary, real_seconds = _timed(run_backfill, config)
            else:
                summary, real_seconds = _timed(run_backfill, config)
                report, dry_seconds = _timed(dry_run, replace(config, out=out + "-unused"))
                assert not os.path.exists(out + "-unused"), "the dry run wrote its output directory"
            estimated = {p.name: p.seconds for p in report.phases}
            real = {p.name: p.seconds for p in summary.phases}
            written = {"plan": _bytes_under(os.path.join(out, "plan")), "new": _bytes_under(out)}
            runs.append({
                "estimate_seconds": report.seconds, "real_seconds": real_seconds, "dry_run_seconds": dry_seconds,
                "phases": {name: {"estimate": estimated[name], "real": real.get(name)} for name in estimated},
                "estimate_bytes": report.storage_bytes, "real_bytes": written["new"],
                "items": report.planned, "dry_run_first": repeat % 2 == 0,
            })  # fmt: skip
            print(report.table())
            print(f"real run: {real_seconds:.1f} s, {written['new']} bytes written\n")
    total_ratio = statistics.median(r["estimate_seconds"] / r["real_seconds"] for r in runs)
    result = {
        "benchmark": "bench_dry_run",
        "images": args.images,
        "size": args.size,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "ratio_time": total_ratio,
        "ratio_bytes": statistics.median(r["estimate_bytes"] / r["real_bytes"] for r in runs),
        "within_2x": 0.5 <= total_ratio <= 2.0,
        "phase_ratios": {
            name: statistics.median(r["phases"][name]["estimate"] / r["phases"][name]["real"] for r in runs)
            for name in runs[0]["phases"]
            if all(r["phases"][name]["real"] for r in runs)
        },
        "runs": runs,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "cpus": os.cpu_count(),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    storage.write_bytes(os.path.abspath(args.out), json.dumps(result, indent=2).encode())
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    return result


if __name__ == "__main__":
    main()
