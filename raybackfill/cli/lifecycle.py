"""`raybackfill promote | rollback | gc | export | stop`: the lifecycle of a serving index's generations.

An index serves one generation (a model version) and, during an upgrade, the next one beside it. ``promote``
makes the upgrade the serving generation and keeps the one it replaced (for ``rollback``) until ``gc`` or the
index's retention; ``export`` writes a generation as an embedding table that ``serve`` and the next upgrade
(``backfill --old-embeddings``) read.
"""

from __future__ import annotations

import argparse
import json

from raybackfill.cli import utc_time
from raybackfill.cli.alias import check_stop, say_alias
from raybackfill.cli.index import add_index_name
from raybackfill.index.router import connect, destroy_index, get
from raybackfill.types import Space

SPACES = {"serving": Space.OLD, "upgrade": Space.NEW}


def register(subparsers: argparse._SubParsersAction) -> None:
    promote = subparsers.add_parser(
        "promote",
        help="make the upgrade the serving generation (every item must be in it)",
        description="Make the new space the serving generation: its vectors become the old space of the next "
        "upgrade. The generation it replaces stays in memory for `raybackfill rollback` until `raybackfill gc` "
        "or the index's --retention.",
    )
    promote.add_argument(
        "--no-retain", action="store_true", help="drop the replaced generation now (no rollback of this promote)"
    )
    add_index_name(promote)
    promote.set_defaults(func=_promote)

    rollback = subparsers.add_parser(
        "rollback",
        help="undo the last lifecycle step: the upgrade under way, else the last promote",
        description="During an upgrade: every item back to the serving generation, the upgrade forgotten. "
        "After a promote (no new upgrade begun): the generation it replaced comes back, with the promoted one "
        "as its upgrade, as before the promote; roll back again to serve the older generation alone.",
    )
    add_index_name(rollback)
    rollback.set_defaults(func=_rollback)

    gc = subparsers.add_parser(
        "gc",
        help="free the generation the last promote replaced (no rollback of it afterwards)",
        description="Drop the retired generation on every shard now and free its memory.",
    )
    add_index_name(gc)
    gc.set_defaults(func=_gc)

    export = subparsers.add_parser(
        "export",
        help="write a generation of the index as an embedding table (id, embedding, model, generation, lineage)",
        description="Every shard writes its part of one space as Parquet under OUT (no process holds the whole "
        "gallery), then OUT/_export.json is written last. The table serves a new index (`raybackfill serve "
        "--old-embeddings OUT`), feeds the next upgrade (`raybackfill backfill --old-embeddings OUT`) or "
        "another system; compressed index kinds (PQ, SQ) export their decoded approximation.",
    )
    export.add_argument("--out", required=True, metavar="URI", help="a new directory (path or s3://)")
    export.add_argument(
        "--space",
        choices=["auto", *SPACES],
        default="auto",
        help="serving: the serving generation (every item); upgrade: the items moved to the new space so far; "
        "auto (default): the upgrade once every item is in it, else the serving generation",
    )
    export.add_argument("--part-rows", type=int, default=100_000, help="items per Parquet part (default 100000)")
    add_index_name(export)
    export.set_defaults(func=_export)

    stop = subparsers.add_parser(
        "stop", help="kill the index router and its shards", description="Kill the index router and its shards."
    )
    add_index_name(stop)
    stop.add_argument(
        "--force", action="store_true", help="stop the index even though aliases point to it (they then fail)"
    )
    stop.set_defaults(func=_stop)


def _counts(counts: dict) -> str:
    return ", ".join(f"{s} {counts[s]:,}" for s in Space)


def _promote(args: argparse.Namespace) -> int:
    say_alias(args.name)
    router = connect(args.name)
    counts = get(router.promote.remote(retain=not args.no_retain))
    health = get(router.health.remote())
    retired = health["retired"]
    kept = "dropped (--no-retain)" if retired is None else f"{retired['version']!r} kept for rollback"
    expires = ""
    if retired and retired["expires_at"] is not None:
        expires = " until " + utc_time(retired["expires_at"])
    print(
        f"promote: serving generation {health['generation']} = {health['old_space']['version']!r} "
        f"({_counts(counts)}); previous generation {kept}{expires}"
    )
    return 0


def _rollback(args: argparse.Namespace) -> int:
    say_alias(args.name)
    router = connect(args.name)
    counts = get(router.rollback.remote())
    progress = get(router.progress.remote())
    print(f"rollback: phase {progress.phase} ({_counts(counts)})")
    return 0


def _gc(args: argparse.Namespace) -> int:
    collected = get(connect(args.name).gc.remote())
    if not collected:
        print("gc: no retired generation to collect")
    else:
        print(f"gc: collected generation {collected['version']!r} ({collected['items']:,} items)")
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.part_rows < 1:
        raise ValueError(f"--part-rows must be positive, got {args.part_rows}")
    router = connect(args.name)
    if args.space == "auto":
        counts = get(router.progress.remote()).counts
        space = Space.NEW if counts[Space.OLD] == 0 and (counts[Space.TRANSFORMED] + counts[Space.NEW]) else Space.OLD
    else:
        space = SPACES[args.space]
    manifest = get(router.export.remote(args.out, space, args.part_rows))
    lineages = ", ".join(f"{lineage} {n:,}" for lineage, n in sorted(manifest["lineages"].items()))
    print(
        f"export: {manifest['items']:,} items of generation {manifest['generation']!r} (dim {manifest['dim']}) in "
        f"{len(manifest['files'])} files under {args.out}; lineages: {lineages or 'none'}"
    )
    print(json.dumps({k: manifest[k] for k in ("generation", "items", "dim", "metric")}))
    return 0


def _stop(args: argparse.Namespace) -> int:
    check_stop(args.name, args.force)
    print("stopped: " + ", ".join(destroy_index(args.name)))
    return 0
