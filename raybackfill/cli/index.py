"""`raybackfill serve | query | status | snapshot`: run and use the serving index.

Every command attaches to the running Ray cluster (RAY_ADDRESS, or the cluster started on this machine)
and finds the index by its actor name in the raybackfill namespace, so they work from any shell.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from raybackfill.cli import utc_time
from raybackfill.cli.alias import say_alias
from raybackfill.cli.encoder import add_trust_arguments, trust_from
from raybackfill.cli.service import add_http_arguments, deploy_http
from raybackfill.index.aliases import get_alias
from raybackfill.index.loading import DEFAULT_TRAIN_SAMPLE, LoadConfig
from raybackfill.index.merge import TopK
from raybackfill.index.progress import Progress
from raybackfill.index.router import DEFAULT_NAME, RouterConfig, connect, create_index, get
from raybackfill.index.serving import serving_strategy
from raybackfill.index.shard import IndexConfig
from raybackfill.types import Metric, Space, Strategy


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="start the serving index over a table of old embeddings",
        description="Create the index router and shard actors (named, detached: they keep serving after "
        "this command exits) and load the old embeddings (Parquet: id, embedding fixed_size_list<float32,d>): "
        "Ray tasks read the table one row group at a time and send each shard its rows, so no process holds "
        "the whole table. An index kind that needs training is trained first on a sample (--train-sample).",
    )
    serve.add_argument(
        "--old-embeddings", metavar="URI", help="old embedding table (path or s3://); optional with --http"
    )
    serve.add_argument("--shards", type=int, default=2, help="number of shard actors (default 2)")
    serve.add_argument("--version", help="old model version tag (default: the table's 'model' column)")
    serve.add_argument(
        "--metric",
        choices=[m.value for m in Metric],
        default=Metric.COSINE.value,
        help="cosine (default; the index normalises vectors and queries), ip (raw inner product) or l2",
    )
    serve.add_argument(
        "--index",
        default=IndexConfig.factory,
        metavar="FACTORY",
        help="FAISS index_factory string per space: Flat (exact, default), 'IVF1024,Flat', 'IVF4096,PQ32', "
        "'OPQ16,IVF1024,PQ16', 'IVF1024,SQ8', HNSW32, PQ16, ...",
    )
    _search_flags(serve, "default for every query")
    serve.add_argument(
        "--ef-construction",
        type=int,
        help="HNSW build candidate list size (efConstruction; default 80: a shard grows its graphs by small "
        "additions, which FAISS's own 40 builds poorly)",
    )
    serve.add_argument(
        "--drop-old-vectors",
        action="store_true",
        help="drop an item's old vector once its true new vector arrives (saves memory; then no strategy "
        "'old' and no rollback)",
    )
    serve.add_argument(
        "--retention",
        type=float,
        metavar="SECONDS",
        help="how long a promote keeps the generation it replaced, for rollback (default: until `raybackfill gc`)",
    )
    serve.add_argument(
        "--shard-cpus",
        type=float,
        default=RouterConfig.shard_num_cpus,
        help="CPUs per shard actor (FAISS threads follow; default 0.25)",
    )
    serve.add_argument("--shard-gpus", type=float, default=0.0, help="GPUs per shard actor (default 0)")
    serve.add_argument(
        "--serving-nice",
        type=int,
        default=RouterConfig.serving_nice,
        metavar="N",
        help="nice value the router, shard and (with --http) service replica processes start at (default 0, the "
        "raylet's; Ray starts its other workers, a backfill's among them, at 15)",
    )
    serve.add_argument(
        "--node-resource",
        metavar="NAME",
        help="custom Ray resource of the nodes that hold the index (e.g. index_node): the router and shards run "
        "only on nodes started with it (default: anywhere)",
    )
    serve.add_argument(
        "--snapshot-uri",
        metavar="URI",
        help="where shards snapshot and restore (path or s3://); the loaded gallery is snapshotted "
        "there at once, so a shard Ray restarts comes back with it instead of empty",
    )
    serve.add_argument(
        "--quarantine",
        metavar="URI",
        help="where rows with a null, NaN or zero vector or a repeated id go (default: refuse them)",
    )
    serve.add_argument(
        "--train-sample",
        type=int,
        default=DEFAULT_TRAIN_SAMPLE,
        metavar="N",
        help="rows of the table (a uniform sample) that train the old space of an index kind that needs training "
        f"(IVF, PQ, SQ; default {DEFAULT_TRAIN_SAMPLE:,}; FAISS wants ~40 x nlist)",
    )
    serve.add_argument(
        "--load-in-flight", type=int, default=LoadConfig.in_flight, help="row groups read at once (default 4)"
    )
    serve.add_argument(
        "--load-batch-rows", type=int, default=LoadConfig.batch_rows, help="rows per call to the shards (default 65536)"
    )
    add_index_name(serve)
    add_http_arguments(serve)
    add_trust_arguments(serve)
    serve.set_defaults(func=_serve)

    query = subparsers.add_parser(
        "query",
        help="top-k of the serving index for an item, a vector, an image or a text",
        description="Query with a stored item (--id: its old and/or new vector), with vectors (--vector, "
        ".npy of shape (d,) or (n, d); rank_merge takes two: --vector OLD.npy --vector NEW.npy), or with "
        "an image or a text embedded by encoder artefacts (--image/--text with one --model per space the "
        "strategy needs).",
    )
    source = query.add_mutually_exclusive_group(required=True)
    source.add_argument("--id", type=int, help="id of a gallery item to use as the query")
    source.add_argument("--vector", action="append", metavar="FILE.npy", help="query vector(s) (.npy)")
    source.add_argument("--image", metavar="FILE", help="query image (any size and format PIL reads)")
    source.add_argument("--text", help="query text")
    query.add_argument(
        "--model",
        action="append",
        metavar="DIR",
        help="encoder artefact that embeds --image/--text; its version picks the space (repeatable)",
    )
    query.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    query.add_argument(
        "--strategy",
        choices=[s.value for s in Strategy],
        help="default: what the index's phase serves best (old before the backfill, rank_merge during, "
        "compatible once every item is new)",
    )
    query.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _search_flags(query, "for this query; default: the index's")
    add_index_name(query)
    add_trust_arguments(query)
    query.set_defaults(func=_query)

    status = subparsers.add_parser(
        "status",
        help="backfill progress of the serving index",
        description="Counts per state and shard, rate, ETA, phase and last error.",
    )
    status.add_argument(
        "--by-model",
        action="store_true",
        help="also the items per model lineage in each generation (which encoder embedded them, which "
        "transformations carried them: 'v1>v2' is a v1 embedding transformed into v2)",
    )
    status.add_argument(
        "--item",
        type=int,
        action="append",
        metavar="ID",
        help="with --by-model: also this item's state and the lineage of its vectors (repeatable)",
    )
    add_index_name(status)
    status.set_defaults(func=_status)

    snapshot = subparsers.add_parser(
        "snapshot",
        help="snapshot every shard now (a restart point)",
        description="Write every shard's state under the index's --snapshot-uri. A shard that Ray restarts "
        "serves its last snapshot, and a backfill replays only what came after it, so snapshot after long runs.",
    )
    add_index_name(snapshot)
    snapshot.set_defaults(func=_snapshot)


def _search_flags(parser: argparse.ArgumentParser, scope: str) -> None:
    parser.add_argument("--nprobe", type=int, help=f"IVF lists searched per query ({scope})")
    parser.add_argument("--ef-search", type=int, help=f"HNSW candidate list size (efSearch; {scope})")


def search_params(args: argparse.Namespace) -> dict[str, int]:
    """The --nprobe / --ef-search flags given, as FAISS search parameters."""
    given = {"nprobe": args.nprobe, "efSearch": args.ef_search}
    return {name: value for name, value in given.items() if value is not None}


def add_index_name(parser: argparse.ArgumentParser) -> None:
    """The --name flag of every command that attaches to a running index."""
    parser.add_argument(
        "--name", default=DEFAULT_NAME, help=f"index (router actor) name or alias (default {DEFAULT_NAME})"
    )


# ------------------------------------------------------------------------- serve
def _serve(args: argparse.Namespace) -> int:
    if not args.old_embeddings:
        if not args.http:
            raise ValueError("serve needs --old-embeddings (or --http alone, to front an index that runs)")
        deploy_http(args)
        return 0
    from tqdm import tqdm

    from raybackfill.data.storage import open_table
    from raybackfill.index.loading import load_old_table

    table = open_table(args.old_embeddings)  # lists the files and reads their footers: no rows are read here
    load = LoadConfig(
        batch_rows=args.load_batch_rows,
        in_flight=args.load_in_flight,
        train_sample=args.train_sample,
        quarantine_uri=args.quarantine,
    )
    config = RouterConfig(
        name=args.name,
        shards=args.shards,
        shard_num_cpus=args.shard_cpus,
        shard_num_gpus=args.shard_gpus,
        index=IndexConfig(
            factory=args.index,
            metric=args.metric,
            search_params=search_params(args),
            build_params={} if args.ef_construction is None else {"efConstruction": args.ef_construction},
            keep_old=not args.drop_old_vectors,
            retention_s=args.retention,
        ),
        snapshot_uri=args.snapshot_uri,
        node_resource=args.node_resource,
        serving_nice=args.serving_nice,
    )
    if args.train_sample < 1:
        raise ValueError(f"--train-sample must be positive, got {args.train_sample}")
    alias = get_alias(args.name)
    if alias is not None:
        raise ValueError(
            f"--name {args.name!r} is an alias (-> index {alias.index!r}): give the new index its own name; clients "
            f"switch to it with `raybackfill alias set {args.name} NEW-INDEX`"
        )
    router = create_index(config)
    serving = get(router.progress.remote()).total
    if serving:
        raise ValueError(
            f"index {args.name!r} already serves {serving} items; `raybackfill stop --name "
            f"{args.name}` first, or serve under another --name"
        )
    with tqdm(total=table.num_rows, desc="load", unit="item", dynamic_ncols=True) as bar:
        summary = load_old_table(router, table, version=args.version, config=load, on_progress=bar.update)
    trained = f"; old space trained on {summary.trained_on} vectors" if summary.trained_on else ""
    quarantined = f"; {summary.quarantined} rows quarantined in {args.quarantine}" if summary.quarantined else ""
    print(
        f"index {args.name!r}: serving {summary.items} items of model {summary.version!r} (dim {summary.dim}, "
        f"{args.metric}, {args.index}) on {args.shards} shards; loaded {summary.row_groups} row groups in "
        f"{summary.seconds:.1f} s{trained}{quarantined}"
    )
    if args.snapshot_uri:
        _print_snapshots(get(router.snapshot.remote()))
    if args.http:
        deploy_http(args)
    return 0


def _snapshot(args: argparse.Namespace) -> int:
    say_alias(args.name)
    _print_snapshots(get(connect(args.name).snapshot.remote()))
    return 0


def _print_snapshots(uris: list[str]) -> None:
    print(f"snapshot of {len(uris)} shards: " + ", ".join(uris))


# ------------------------------------------------------------------------- query
def _query(args: argparse.Namespace) -> int:
    router = connect(args.name)
    strategy = Strategy(args.strategy) if args.strategy else serving_strategy(get(router.progress.remote()).phase)
    if args.id is not None:
        q_old, q_new = _item_queries(router, args.id, strategy)
    elif args.vector:
        q_old, q_new = _vector_queries(args.vector, strategy)
    else:
        content = Path(args.image).read_bytes() if args.image else args.text
        q_old, q_new = _content_queries(router, content, args.model, strategy, trust_from(args))
    result = get(router.search.remote(q_old, q_new, args.k, strategy, search_params(args) or None))
    print(json.dumps(_as_json(result)) if args.json else format_results(result))
    return 0


def _item_queries(router, item: int, strategy: Strategy) -> tuple[np.ndarray | None, np.ndarray | None]:
    stored = get(router.vectors.remote(np.array([item], dtype=np.int64)))
    if strategy is not Strategy.COMPATIBLE and stored.old is not None and np.isnan(stored.old).any():
        raise ValueError(f"item {item} has no old vector: the index dropped it (--drop-old-vectors)")
    if strategy is Strategy.OLD:
        if stored.old is None:
            raise ValueError(f"item {item} has no vector in the serving generation")
        return stored.old, None
    if stored.new is None and strategy is Strategy.COMPATIBLE and stored.old is not None:
        return None, stored.old  # no upgrade under way (e.g. just promoted): the serving generation is the one space
    if stored.new is None or stored.states[0] == Space.OLD.code:
        raise ValueError(f"item {item} has no new-space vector yet (state old); use --strategy old")
    return (stored.old if strategy is Strategy.RANK_MERGE else None), stored.new


def _vector_queries(files: list[str], strategy: Strategy) -> tuple[np.ndarray | None, np.ndarray | None]:
    vectors = [np.load(Path(f), allow_pickle=False) for f in files]
    needed = 2 if strategy is Strategy.RANK_MERGE else 1
    if len(vectors) != needed:
        raise ValueError(
            f"strategy {strategy.value!r} takes {needed} --vector file(s), got {len(vectors)}"
            + (" (rank_merge: --vector OLD.npy --vector NEW.npy)" if needed == 2 else "")
        )
    if strategy is Strategy.OLD:
        return vectors[0], None
    if strategy is Strategy.COMPATIBLE:
        return None, vectors[0]
    return vectors[0], vectors[1]


def _content_queries(router, content: bytes | str, models: list[str] | None, strategy: Strategy, trust):
    """Embed an image (bytes) or a text with each --model, prepared as the encoder declares; the encoder's
    version says which space its query is for (raybackfill.service.queries does the work)."""
    if not models:
        raise ValueError("image and text queries need --model DIR (the encoder artefact(s) that embed them)")
    from raybackfill.service.queries import MissingEncoderError, QueryEncoders

    encoders = QueryEncoders.matching(models, get(router.health.remote()), trust=trust)
    try:
        embedded = encoders.embed([content], strategy)
    except MissingEncoderError as err:
        spaces = " and ".join(s.value for s in err.spaces)
        raise ValueError(f"strategy {strategy.value!r} needs a --model for the {spaces} space") from None
    if embedded.failed:
        raise ValueError(f"cannot prepare the query ({embedded.failed[0]})")
    return embedded.rows([0])


def _as_json(result: TopK) -> list[list[dict]]:
    names = result.space_names()
    return [
        [{"id": int(i), "score": float(s), "space": n} for i, s, n in zip(ids, scores, row, strict=True) if i >= 0]
        for ids, scores, row in zip(result.ids, result.scores, names, strict=True)
    ]


def format_results(result: TopK) -> str:
    lines = []
    for q, hits in enumerate(_as_json(result)):
        if result.ids.shape[0] > 1:
            lines.append(f"query {q}")
        lines.append(f"{'rank':>4}  {'id':>12}  {'score':>12}  space")
        lines += [f"{r:>4}  {h['id']:>12}  {h['score']:>12.5f}  {h['space']}" for r, h in enumerate(hits, 1)]
    return "\n".join(lines)


# ------------------------------------------------------------------------- status
def _status(args: argparse.Namespace) -> int:
    say_alias(args.name)
    router = connect(args.name)
    print(format_status(get(router.progress.remote())))
    if args.item and not args.by_model:
        raise ValueError("--item goes with --by-model")
    if args.by_model:
        print()
        print(format_provenance(get(router.provenance.remote())))
        if args.item:
            stored = get(router.vectors.remote(np.asarray(args.item, dtype=np.int64)))
            print()
            print(f"{'item':>12}  {'state':<12} {'serving lineage':<24} upgrade lineage")
            none = [None] * len(args.item)
            rows = zip(args.item, stored.states, stored.old_lineage or none, stored.new_lineage or none, strict=True)
            for item, state, old, new in rows:
                print(f"{item:>12}  {Space.from_code(state).value:<12} {old or '-':<24} {new or '-'}")
    return 0


def format_provenance(provenance: dict) -> str:
    """The items per model lineage of each generation (``router.provenance()``), one table per space."""
    lines = [f"generation {provenance['generation']}"]
    old, new, retired = provenance["old"], provenance["new"], provenance["retired"]
    if old is not None:
        lines.append(f"serving {old['version']!r}: {sum(old['lineages'].values()):,} items")
        lines.extend(f"  {lineage:<30} {n:>13,}" for lineage, n in sorted(old["lineages"].items()))
    if new is not None:
        total = sum(sum(states.values()) for states in new["lineages"].values())
        lines.append(f"upgrade {new['version']!r}: {total:,} items")
        for lineage, states in sorted(new["lineages"].items()):
            per_state = ", ".join(f"{state} {n:,}" for state, n in sorted(states.items()))
            lines.append(f"  {lineage:<30} {sum(states.values()):>13,}  ({per_state})")
    if retired is not None:
        expires = "until gc"
        if retired["expires_at"] is not None:
            expires = "until " + utc_time(retired["expires_at"])
        lines.append(f"retired {retired['version']!r}: {retired['items']:,} items, kept for rollback {expires}")
    return "\n".join(lines)


def progress_bar(fraction: float, width: int = 30) -> str:
    filled = int(round(min(max(fraction, 0.0), 1.0) * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_status(p: Progress, now: float | None = None) -> str:
    now = time.time() if now is None else now
    started = "not started"
    if p.started_at is not None:
        when = utc_time(p.started_at)
        started = f"started {when} ({_duration(now - p.started_at)} ago)"
    lines = [f"index {p.name}   phase {p.phase}   {started}", ""]
    lines.append(f"{'shard':<6}" + "".join(f"{s:>13}" for s in Space) + f"{'total':>13}")
    for i, counts in enumerate(p.per_shard):
        lines.append(f"{i:<6}" + "".join(f"{counts[s]:>13,}" for s in Space) + f"{sum(counts.values()):>13,}")
    lines.append(f"{'all':<6}" + "".join(f"{p.counts[s]:>13,}" for s in Space) + f"{p.total:>13,}")
    lines.append("")
    lines.append(f"new model  {progress_bar(p.fraction_new)} {100 * p.fraction_new:5.1f}%")
    lines.append(
        f"new space  {progress_bar(p.fraction_in_new_space)} {100 * p.fraction_in_new_space:5.1f}%"
        "  (transformed or new)"
    )
    eta = "unknown" if p.eta_seconds is None else _duration(p.eta_seconds)
    lines.append(f"rate {p.rate:,.1f} items/s   remaining {p.remaining:,}   ETA {eta}")
    if p.last_error:
        lines.append(f"last error: {p.last_error}")
    return "\n".join(lines)
