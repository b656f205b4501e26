"""`raybackfill eval run | compare | merge | live`: offline backfill curves, reports side by side or as one,
live index quality.

`run` is also the argument list of jobs/evaluate.py (`add_run_arguments` + `run_command`), so the job and
the CLI take the same flags.
"""

from __future__ import annotations

import argparse
import json

from raybackfill.eval.curves import DEFAULT_POINTS
from raybackfill.eval.live import DEFAULT_K, DEFAULT_MAX_PROBES, LabelLookup, ProbeSet, live_quality
from raybackfill.eval.offline import (
    COLUMN_PREFIX,
    EvalInputs,
    OfflineConfig,
    Order,
    evaluate_tables,
    write_outputs,
)
from raybackfill.eval.report import TABLE_COLUMNS, compare_reports, load_report, merge_reports, summary_table
from raybackfill.index.router import DEFAULT_NAME, connect
from raybackfill.types import MODEL_METRICS, Method, Metric, Policy, Strategy


def register(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser(
        "eval",
        help="evaluate an upgrade: backfill curves, reports, live index quality",
        description="Offline: backfill curves of a method on embedding tables (run), several reports side "
        "by side (compare) or as one (merge). Online: top-1 / mAP@k of the serving index on a labelled probe "
        "set (live).",
    )
    sub = evaluate.add_subparsers(dest="eval_command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="backfill curves, AUC, relative gain and NFR of one method on embedding tables",
        description="Evaluate one method over a grid of backfilled fractions for each backfill order; write "
        "OUT/report.json, OUT/backfill_curves.png and OUT/report.md, and print the tables.",
    )
    add_run_arguments(run)
    run.set_defaults(func=run_command)

    compare = sub.add_parser(
        "compare",
        help="several report.json files side by side",
        description="Print the summaries of several reports side by side, one row per run.",
    )
    compare.add_argument("reports", nargs="+", metavar="REPORT", help="report.json files (path or s3://)")
    compare.add_argument(
        "--keys",
        nargs="+",
        choices=list(TABLE_COLUMNS),
        default=["auc_top1", "auc_map", "max_nfr"],
        metavar="KEY",
        help=f"summary values per report, from: {', '.join(TABLE_COLUMNS)} (default auc_top1 auc_map max_nfr)",
    )
    compare.add_argument("--markdown", action="store_true", help="print a markdown table")
    compare.set_defaults(func=_compare)

    merge = sub.add_parser(
        "merge",
        help="several report.json files of one evaluation as one report",
        description="Join the reports of one evaluation run as several jobs (e.g. one per method) into one "
        "report: OUT/report.json, OUT/backfill_curves.png with every curve, OUT/report.md. Metric, protocol, "
        "queries and shared anchors must agree, and each run may appear once.",
    )
    merge.add_argument("reports", nargs="+", metavar="REPORT", help="report.json files (path or s3://)")
    merge.add_argument("--out", required=True, metavar="DIR", help="output directory (path or s3://)")
    merge.set_defaults(func=_merge)

    live = sub.add_parser(
        "live",
        help="top-1 and mAP@k of the serving index on a labelled probe set",
        description="One batched search of a fixed seeded sample of probes against the running index; mAP@k "
        "is the AP over the returned top-k list, normalised by min(k, #relevant). Probes must not be gallery "
        "items (disjoint protocol).",
    )
    live.add_argument("--probes-old", metavar="URI", help="probe embedding table in the old space (with label)")
    live.add_argument("--probes-new", metavar="URI", help="probe embedding table in the new space (with label)")
    live.add_argument(
        "--gallery-labels",
        required=True,
        metavar="URI",
        help="table with the served gallery's id and label (embedding or image table)",
    )
    live.add_argument(
        "--strategy", choices=[s.value for s in Strategy], default=Strategy.RANK_MERGE.value, help="default rank_merge"
    )
    live.add_argument("--k", type=int, default=DEFAULT_K, help=f"results per probe (default {DEFAULT_K})")
    live.add_argument(
        "--max-probes",
        type=int,
        default=DEFAULT_MAX_PROBES,
        help=f"probes per reading, a fixed sample (default {DEFAULT_MAX_PROBES})",
    )
    live.add_argument("--seed", type=int, default=0, help="seed of the probe sample (default 0)")
    live.add_argument("--name", default=DEFAULT_NAME, help=f"index (router actor) name (default {DEFAULT_NAME})")
    live.add_argument(
        "--url",
        help="query through the HTTP search service at this URL (e.g. http://127.0.0.1:8000), so the figures are "
        "what its clients see; default: call the router directly",
    )
    live.add_argument("--api-key-env", metavar="VAR", help="with --url: send the value of $VAR as the API key")
    live.add_argument("--json", action="store_true", help="print JSON")
    live.set_defaults(func=_live)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The offline evaluation's flags (shared by `raybackfill eval run` and jobs/evaluate.py)."""
    tables = parser.add_argument_group("embedding tables (id, embedding; the old tables also label)")
    tables.add_argument("--queries-old", required=True, metavar="URI", help="queries, old model")
    tables.add_argument("--queries-new", required=True, metavar="URI", help="queries, new model")
    tables.add_argument("--gallery-old", required=True, metavar="URI", help="gallery, old model")
    tables.add_argument("--gallery-new", required=True, metavar="URI", help="gallery, new model")
    tables.add_argument(
        "--gallery-transformed",
        metavar="URI",
        help="gallery, old embeddings through the forward transformation (FCT / FastFill)",
    )
    tables.add_argument("--psi-queries", metavar="URI", help="psi(new query embeddings) (rank_merge_psi)")
    parser.add_argument(
        "--method", required=True, choices=[m.value for m in Method], help="compatibility method (its serving strategy)"
    )
    parser.add_argument(
        "--order", action="append", metavar="ORDER", dest="orders",
        help=f"backfill order, repeatable: {', '.join(Policy)} or {COLUMN_PREFIX}NAME (a score column of the old "
        "or transformed gallery table, highest first); default random",
    )  # fmt: skip
    parser.add_argument("--transformation", metavar="DIR", help="FastFill artefact (order uncertainty)")
    parser.add_argument("--old-model", metavar="DIR", help="old backbone artefact (orders entropy, least_confidence)")
    parser.add_argument(
        "--betas",
        type=int,
        default=DEFAULT_POINTS,
        help=f"points of the even beta grid 0..1 (default {DEFAULT_POINTS})",
    )
    parser.add_argument(
        "--metric",
        choices=[m.value for m in MODEL_METRICS],
        default=Metric.COSINE.value,
        help="cosine similarity (default) or l2: Euclidean distance, the reference code's protocol",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random order (default 0)")
    parser.add_argument(
        "--random-seeds",
        type=int,
        default=1,
        metavar="N",
        help="measure the random order over N seeds (seed, seed+1, ...) and judge the other orders against "
        "that band (default 1: one random order)",
    )
    parser.add_argument("--memory-mb", type=int, default=2048, help="working memory per query block (default 2048)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (path or s3://)")


def run_command(args: argparse.Namespace) -> int:
    inputs = EvalInputs(
        args.queries_old,
        args.queries_new,
        args.gallery_old,
        args.gallery_new,
        args.gallery_transformed,
        args.psi_queries,
    )
    config = OfflineConfig(
        method=args.method,
        orders=tuple(Order.parse(order) for order in args.orders or [Policy.RANDOM]),
        beta_points=args.betas,
        metric=args.metric,
        seed=args.seed,
        random_seeds=args.random_seeds,
        memory_budget_mb=args.memory_mb,
        transformation=args.transformation,
        old_model=args.old_model,
    )
    report = evaluate_tables(inputs, config)
    paths = write_outputs(report, args.out)
    print(summary_table(report))
    print("\nwrote " + ", ".join(paths.values()))
    return 0


def _compare(args: argparse.Namespace) -> int:
    reports = {uri: load_report(uri) for uri in args.reports}
    print(compare_reports(reports, keys=args.keys, markdown=args.markdown))
    return 0


def _merge(args: argparse.Namespace) -> int:
    report = merge_reports([load_report(uri) for uri in args.reports])
    paths = write_outputs(report, args.out)
    print(summary_table(report))
    print("\nwrote " + ", ".join(paths.values()))
    return 0


def _live(args: argparse.Namespace) -> int:
    probes = ProbeSet.read(args.probes_old, args.probes_new)
    lookup = LabelLookup.read(args.gallery_labels)
    from raybackfill.service.client import ServiceClient

    target = ServiceClient.from_env(args.url, args.api_key_env) if args.url else connect(args.name)
    quality = live_quality(
        target, probes, lookup, strategy=args.strategy, k=args.k, max_probes=args.max_probes, seed=args.seed
    )
    if args.json:
        print(json.dumps(quality.as_dict()))
    else:
        print(
            f"{'service ' + args.url if args.url else 'index ' + repr(args.name)}, strategy {quality.strategy}, "
            f"{quality.protocol}: top-1 {quality.top1:.3f}, "
            f"mAP@{quality.k} {quality.map_at_k:.3f} over {quality.probes} probes "
            f"({quality.dropped} dropped: no relevant gallery item); search {quality.latency_s * 1000:.0f} ms"
        )
    return 0
