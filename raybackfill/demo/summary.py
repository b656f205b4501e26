"""The short account of a demo for the terminal: anchors, the best order of each method, where the files are.
The full tables (every run, orders against random ones, the papers' directions) are in report.md."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from raybackfill.eval.chain import CHAIN_HEADER, chain_rows, comparison_line
from raybackfill.eval.findings import Verdict, findings
from raybackfill.eval.offline import Order
from raybackfill.eval.report import render_table, versus_random

ANCHORS = (("old_old", "old query / old gallery"), ("new_new", "new query / new gallery"))


def best_orders(report: Mapping) -> list[Mapping]:
    """Per method (in report order), its run with the largest mAP area among the backfill policies (score
    columns such as the diagnostics' oracle are bounds, not orders a service could use; the first listed
    wins a tie)."""
    best: dict[str, Mapping] = {}
    for run in report["runs"]:
        if Order.parse(run["policy"]).policy is None:
            continue
        kept = best.get(run["method"])
        if kept is None or run["auc_map"] > kept["auc_map"]:
            best[run["method"]] = run
    return list(best.values())


def summary(report: Mapping, files: Sequence[str]) -> str:
    """A few lines: what was measured, the two anchors, each method's best order, the papers' directions, the
    online phase, and ``files``."""
    q = report["queries"]
    points = len(report["runs"][0]["betas"]) if report["runs"] else 0
    lines = [
        f"metric {report['metric']}, protocol {report['protocol']}, {q['evaluated']} queries; "
        f"AUC = mean over {points} backfill fractions from 0 to 1",
        "",
        render_table(
            ["anchor", "top-1", "mAP"],
            [[label, report["anchors"][key]["top1"], report["anchors"][key]["map"]] for key, label in ANCHORS],
        ),
        "",
    ]
    z = {(r["method"], r["policy"]): r["auc_map_z"] for r in versus_random(report)}

    def z_of(run: Mapping) -> str:
        value = z.get((run["method"], run["policy"]))
        return "-" if value is None else f"{value:+.1f}"

    header = ["method", "best order", "top-1 at beta 0", "AUC top-1", "AUC mAP", "z vs random", "max NFR"]
    rows = [
        [run["method"], run["policy"], run["top1"][0], run["auc_top1"], run["auc_map"], z_of(run), run["max_nfr"]]
        for run in best_orders(report)
    ]
    lines.append("best order per method (by mAP area; z: its gap to random orders, in their sd)")
    lines.append(render_table(header, rows))
    verdicts = [f.verdict for f in findings(report)]
    counts = ", ".join(f"{verdicts.count(v)} {v.value}" for v in Verdict if verdicts.count(v))
    lines += ["", f"the papers' directions on this run: {counts} (report.md has each one)"]
    adapters = report.get("adapters")
    if adapters:

        def shown(label_free: bool) -> str:
            rows = [r for r in adapters["rows"] if r["label_free"] is label_free]
            return ", ".join(f"{r['name'].removeprefix('adapter_')} {_top1(r)}" for r in rows) or "-"

        below = adapters["below_old_old"]
        lines += [
            f"new query / mapped old gallery top-1: label-free adapters {shown(True)}",
            f"  trained with labels and the new classifier: {shown(False)}; "
            + (f"below old/old: {', '.join(below)}" if below else "all above old/old"),
        ]
    online = report.get("online")
    if online:
        line = (
            f"online: {online['items']} items in {online['seconds']:.0f}s, {online['queries']} live queries, "
            f"{online['query_errors']} errors"
        )
        if "live_top1_before" in online:
            line += f"; live top-1 {online['live_top1_before']:.3f} (old) -> {online['live_top1_after']:.3f} (after)"
        lines.append(line)
    chain = report.get("chain")
    if chain:
        lines += ["", *chain_block(chain)]
    lines.append("files: " + ", ".join(files))
    return "\n".join(lines)


def chain_block(chain: Mapping) -> list[str]:
    """The chained upgrade in a few lines: its anchors, the v3 backfill per v2 state and order (a priority
    order's z against the random orders, ``noise`` inside their spread) and the stopped-vs-finished verdict."""
    a = chain["anchors"]
    top1 = ", ".join(f"{label} {a[key]['top1']:.3f}" for key, label in CHAIN_SHOWN)
    lines = [
        f"chained upgrade v1 -> v2 -> v3, v3 started with v2's backfill at {chain['v2_fraction']:.0%} "
        f"(v3 queries; top-1 {top1})",
        render_table(CHAIN_HEADER, chain_rows(chain)),
    ]
    if "comparison" in chain:
        lines.append(comparison_line(chain["comparison"]))
    return lines


CHAIN_SHOWN = (("v1_v1", "v1/v1"), ("v2_v2", "v2/v2"), ("v3_v3", "v3/v3"), ("v3_h23_h12_v1", "v3/h23(h12(v1))"))


def _top1(row: Mapping) -> str:
    return "-" if row["top1"] is None else f"{row['top1']:.3f}"
