"""`raybackfill demo`: the whole compatible upgrade on built-in data (or a given table), on a local Ray cluster."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import time
from collections.abc import Iterator

from raybackfill.demo.configs import DemoConfig
from raybackfill.demo.online import run_online
from raybackfill.demo.pipeline import run_demo
from raybackfill.demo.summary import summary
from raybackfill.eval.offline import output_files
from raybackfill.logs import LEVEL_ENV
from raybackfill.runtime import init_ray
from raybackfill.service.client import ServiceClient
from raybackfill.types import MODEL_METRICS, Metric

DEFAULT_OUT = "raybackfill-demo"


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="train every method on built-in data and write report.json, report.md and the plots",
        description="Make the built-in dataset (or read --data), train the old and new models and every "
        "compatibility artefact (BCT, RACT, side-information, FCT, FastFill, psi), embed and transform the "
        "gallery, serve it from a live index backfilled under queries, evaluate every method x backfill order, "
        "print a short summary and write OUT/report.md (every table), OUT/report.json, OUT/backfill_curves.png "
        "and OUT/online_quality.png (with --chain also OUT/chain_curves.png). Starts a local Ray cluster unless "
        "RAY_ADDRESS names one.",
    )
    demo.add_argument("--out", default=DEFAULT_OUT, help=f"output directory, must be new (default {DEFAULT_OUT})")
    demo.add_argument("--quick", action="store_true", help="smaller data and fewer epochs (a few minutes)")
    demo.add_argument(
        "--text",
        action="store_true",
        help="the text upgrade instead, without labels on the upgrade path: the standard library's docstrings, a "
        "hashed bag-of-words v1 and a character n-gram v2, a paired sample, every adapter kind with its gate "
        "table, the instant phase and a priority backfill under live queries (offline, about a minute with --quick)",
    )
    demo.add_argument(
        "--data",
        metavar="URI",
        help="labelled image table (id, image, label) instead of built-in data; with --text a labelled text table "
        "(id, text, label)",
    )
    demo.add_argument(
        "--old-classes",
        default="half",
        metavar="SPEC",
        help="classes the old model trains on: 'half' (lower half of the class ids), '0-49', '0,1,5-9' or "
        "'named:WORD,WORD' (classes whose name has one of the words, e.g. named:hue000,hue030) (default half)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed for data, splits, training and random order")
    demo.add_argument(
        "--metric",
        choices=[m.value for m in MODEL_METRICS],
        default=Metric.COSINE.value,
        help="how every figure is scored: cosine similarity (default) or l2, Euclidean distance",
    )
    demo.add_argument(
        "--diagnostics",
        action="store_true",
        help="also report research diagnostics: how FastFill's uncertainty ranks items by their true error, and "
        "the oracle order by that error (a bound no service can use: it reads the new embeddings)",
    )
    demo.add_argument(
        "--chain",
        action="store_true",
        help="also evaluate a chained upgrade v1 -> v2 -> v3: train a third, wider backbone v3 and a FastFill "
        "transformation h23 (v2 -> v3), start the v3 upgrade while v2's backfill has re-embedded "
        "--chain-v2-fraction of the gallery (items v2 never reached are served through h23(h12(v1))), and report "
        "the v3 backfill's curves against a finished v2 (report.json 'chain', OUT/chain_curves.png); image demo only",
    )
    demo.add_argument(
        "--chain-v2-fraction",
        type=float,
        default=0.5,
        metavar="F",
        help="with --chain: the share of the gallery v2's backfill re-embedded (in its uncertainty order) when the "
        "v3 upgrade starts, in [0, 1] (default 0.5)",
    )
    demo.add_argument(
        "--url",
        help="the online phase queries through the HTTP search service at this URL (start it with `raybackfill "
        "serve --http --name raybackfill-demo`); default: it calls the index router directly",
    )
    demo.add_argument("--api-key-env", metavar="VAR", help="with --url: send the value of $VAR as the API key")
    demo.add_argument("--verbose", action="store_true", help="log every training epoch")
    demo.set_defaults(func=_demo)


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    return DemoConfig(
        out=args.out,
        quick=args.quick,
        data=args.data,
        old_classes=args.old_classes,
        seed=args.seed,
        metric=args.metric,
        diagnostics=args.diagnostics,
        chain=args.chain,
        chain_v2_fraction=args.chain_v2_fraction,
    )


@contextlib.contextmanager
def _demo_logging(verbose: bool) -> Iterator[None]:
    """Stage lines of the demo on stderr; Ray Data's per-dataset lines and (unless verbose) the per-epoch
    training lines stay quiet. Ray Data sets its loggers' levels when imported, so this runs after the import;
    the previous levels come back afterwards."""
    levels = {"ray.data": logging.WARNING, "ray.train": logging.WARNING}
    if LEVEL_ENV not in os.environ:  # a level the user asked for (--log-level) stands
        levels["raybackfill"] = logging.INFO
    if not verbose:
        levels["raybackfill.train"] = logging.WARNING
    previous = {name: logging.getLogger(name).level for name in levels}
    library = logging.getLogger("raybackfill")
    added = logging.StreamHandler() if not library.handlers else None  # the CLI normally installed one
    if added is not None:
        library.addHandler(added)
    # Stage lines read best short: the time and the message (restored after the run).
    formatters = [(h, h.formatter) for h in library.handlers]
    for handler, _ in formatters:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for handler, formatter in formatters:
            handler.setFormatter(formatter)
        if added is not None:
            library.removeHandler(added)
        for name, level in previous.items():
            logging.getLogger(name).setLevel(level)


def _demo(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    config = config_from_args(args)
    if args.text:
        _text_demo(config, args.verbose, start)
        return
    with _demo_logging(args.verbose):
        init_ray()
        scale = config.resolved_scale()
        service = ServiceClient.from_env(args.url, args.api_key_env) if args.url else None
        report = run_demo(config, online=functools.partial(run_online, config=scale.online, service=service))
    files = [f"{config.out}/{name}" for name in output_files(report)]
    print()
    print(summary(report, files))
    print(f"done in {time.perf_counter() - start:.0f}s; the full tables are in {config.out}/report.md")


def _text_demo(config: DemoConfig, verbose: bool, start: float) -> None:
    from raybackfill.demo.text import run_text_demo, text_summary

    if config.diagnostics:
        raise ValueError("--diagnostics reads the new model's classifier: the text demo has none on its upgrade path")
    if config.chain:
        raise ValueError("--chain trains a third image backbone: the text demo has two encoders and no chain")
    with _demo_logging(verbose):
        init_ray()
        report = run_text_demo(config)
    files = [f"{config.out}/{name}" for name in output_files(report)]
    print()
    print(text_summary(report, files))
    print(f"done in {time.perf_counter() - start:.0f}s; the full tables are in {config.out}/report.md")
