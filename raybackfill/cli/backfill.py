"""`raybackfill backfill`: move a live index to a new model, highest-priority items first, resumably."""

from __future__ import annotations

import argparse
import os

from raybackfill.cli.encoder import add_pool_arguments, add_trust_arguments, pool_from, trust_from
from raybackfill.index.loading import DEFAULT_TRAIN_SAMPLE
from raybackfill.index.router import DEFAULT_NAME
from raybackfill.types import Method, Policy

DESCRIPTION = (
    "Rank the gallery with a priority policy and write the plan under OUT/plan (ids, ranks, tiers and where "
    "each item lives in the gallery: no image is copied); an index kind that needs training gets its new space "
    "trained on a sample first; methods with a forward transformation then transform every stored old "
    "embedding (the instant phase); then re-embed the images with the new model tier by tier, reading them "
    "from the gallery, writing each batch under OUT/new and upserting it into the running index. Re-running the "
    "same command after a crash or a --budget/--until stop continues where the last run stopped; bad rows go "
    "to OUT/quarantine."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The backfill's arguments, shared by this command and jobs/backfill.py."""
    parser.add_argument("--gallery", required=True, metavar="URI", help="gallery image table (path or s3://)")
    parser.add_argument("--old-embeddings", required=True, metavar="URI", help="stored old embeddings (+ side_info)")
    parser.add_argument(
        "--upgrade",
        required=True,
        metavar="MODEL_DIR",
        help="the new encoder artefact (trained here, or registered with `raybackfill encoder`)",
    )
    parser.add_argument("--transformation", metavar="MODEL_DIR", help="forward transformation (FCT / FastFill)")
    parser.add_argument(
        "--min-adapter-recall",
        type=float,
        metavar="R",
        help="refuse a --transformation whose recorded adapter recall@k (`train adapter`) is below R",
    )
    parser.add_argument("--old-model", metavar="MODEL_DIR", help="old backbone (its classifier: entropy policies)")
    parser.add_argument(
        "--method", required=True, choices=[m.value for m in Method], help="the compatible-upgrade method"
    )
    parser.add_argument(
        "--policy",
        default=Policy.UNCERTAINTY.value,
        choices=[p.value for p in Policy],
        help="priority (default uncertainty)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random policy (default 0)")
    parser.add_argument("--tiers", type=int, default=8, help="priority tiers (default 8)")
    parser.add_argument("--out", required=True, metavar="URI", help="outputs and ledger (same URI = resume)")
    stop = parser.add_mutually_exclusive_group()
    stop.add_argument(
        "--budget",
        type=int,
        metavar="N",
        help="re-embed at most N items in this run (the instant phase always completes)",
    )
    stop.add_argument("--until", type=float, metavar="FRACTION", help="stop once FRACTION of the gallery is done")
    parser.add_argument(
        "--max-rate",
        type=float,
        metavar="ITEMS_PER_S",
        help="write at most this many items/s per phase, to spare a busy index (default: no limit)",
    )
    parser.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.01,
        help="fail when more than this share of rows is quarantined (default 0.01)",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--index", default=DEFAULT_NAME, help=f"name of the running index (default {DEFAULT_NAME})")
    target.add_argument("--no-index", action="store_true", help="only write the outputs; update no index")
    parser.add_argument(
        "--train-sample",
        type=int,
        default=DEFAULT_TRAIN_SAMPLE,
        metavar="N",
        help="items the new space is trained on when the index kind needs training (transformed old embeddings, "
        f"else images embedded up front; default {DEFAULT_TRAIN_SAMPLE:,})",
    )
    add_pool_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="write nothing: time a sample of each phase on this cluster and print items, tiers, estimated time "
        "and bytes per phase and the storage the run needs",
    )
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else the cluster on this machine)")
    add_trust_arguments(parser)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("backfill", help="backfill a live index with a new model", description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Attach to Ray, run the backfill, print the summary table."""
    from raybackfill.adapters.gate import check_adapter
    from raybackfill.backfill.run import BackfillConfig, run_backfill, summary_table
    from raybackfill.runtime import init_ray

    if args.min_adapter_recall is not None:  # the adapter gate, before anything starts
        if not args.transformation:
            raise ValueError("--min-adapter-recall gates --transformation, and none was given")
        check_adapter(args.transformation, args.min_adapter_recall, direction="old-to-new")

    config = BackfillConfig(
        gallery=args.gallery, old_embeddings=args.old_embeddings, upgrade=args.upgrade, out=args.out,
        method=args.method, transformation=args.transformation, old_model=args.old_model, policy=args.policy,
        seed=args.seed, tiers=args.tiers, budget=args.budget, until=args.until,
        max_bad_fraction=args.max_bad_fraction, max_rate=args.max_rate, index=None if args.no_index else args.index,
        pool=pool_from(args), train_sample=args.train_sample,
        progress=not args.no_progress, trust=trust_from(args),
    )  # fmt: skip
    # A live index runs on an existing cluster: attach to it (RAY_ADDRESS or the one on this machine).
    # A dry run touches no index: it joins the cluster on this machine if there is one, else starts one.
    attach = "auto" if config.index and not args.dry_run else None
    init_ray(args.address or os.environ.get("RAY_ADDRESS") or attach, py_modules=args.py_module)
    if args.dry_run:
        from raybackfill.backfill.estimate import dry_run

        print(dry_run(config).table())
        return 0
    summary = run_backfill(config)
    print(summary_table(summary))
    return 0
