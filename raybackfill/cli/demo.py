"""`raybackfill demo`: the whole compatible upgrade on built-in data (or a given table), on a local Ray cluster."""

from __future__ import annotations

import argparse
import logging
import time

from raybackfill.demo.pipeline import DemoConfig, run_offline
from raybackfill.eval.offline import output_files
from raybackfill.eval.report import summary_table
from raybackfill.runtime import init_ray

DEFAULT_OUT = "raybackfill-demo"


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="train every method on built-in data and write report.json, report.md and the plots",
        description="Make the built-in dataset (or read --data), train the old and new models and every "
        "compatibility artefact (BCT, RACT, side-information, FCT, FastFill, psi), embed and transform the "
        "gallery, serve it from a live index backfilled under queries, evaluate every method x backfill policy, "
        "and write OUT/report.json, OUT/report.md, OUT/backfill_curves.png and OUT/online_quality.png. Starts "
        "a local Ray cluster unless RAY_ADDRESS names one.",
    )
    demo.add_argument("--out", default=DEFAULT_OUT, help=f"output directory, must be new (default {DEFAULT_OUT})")
    demo.add_argument("--quick", action="store_true", help="smaller data and fewer epochs (a few minutes)")
    demo.add_argument("--data", metavar="URI", help="labelled image table (id, image, label) instead of built-in data")
    demo.add_argument(
        "--old-classes",
        default="half",
        metavar="SPEC",
        help="classes the old model trains on: 'half' (lower half of the class ids), '0-49', '0,1,5-9' or "
        "'named:WORD,WORD' (classes whose name has one of the words, e.g. named:hue000,hue030) (default half)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed for data, splits, training and random order")
    demo.set_defaults(func=_demo)


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    return DemoConfig(out=args.out, quick=args.quick, data=args.data, old_classes=args.old_classes, seed=args.seed)


def _demo(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    # Ray Data logs every dataset execution at INFO; the demo prints its own stage lines instead.
    for name in ("ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    init_ray()
    config = config_from_args(args)
    from raybackfill.demo.online import run_online

    report = run_offline(config, online=run_online)
    print()
    print(summary_table(report))
    seconds = time.perf_counter() - start
    print(f"\nwrote {', '.join(f'{config.out}/{name}' for name in output_files(report))} in {seconds:.0f}s")
    if "online" not in report:
        print("note: the online phase (live index + backfill under queries) did not run; report.json has no 'online'")
