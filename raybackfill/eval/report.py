"""The evaluation report (report.json): one stable schema that tools, plots and the checker read.

Schema (version 1); all metrics are fractions in [0, 1], null where undefined:
    {
      "schema": 1,
      "metric": "cosine" | "l2",               # similarity used for every number below
      "protocol": "disjoint" | "leave_one_out",
      "queries": {"evaluated": int, "dropped": int},   # dropped: no relevant gallery item
      "auc": "mean over even grid",             # what auc_top1 / auc_map mean
      "anchors": {                              # fixed-model evaluations; old_old and new_new always
        "old_old": {"top1", "top5", "map", "map_at_r"},
        "new_new": {...},
        "<other cross test, e.g. new_old, new_transformed>": {...}
      },
      "runs": [{
        "method": str, "policy": str, "strategy": "old" | "compatible" | "rank_merge",
        "betas": [...], "top1": [...], "top5": [...], "map": [...], "nfr": [...],   # one per beta
        "auc_top1", "auc_map",                    # mean over the even beta grid
        "auc_top1_trapezoid", "auc_map_trapezoid",
        "relative_gain_top1", "relative_gain_map",  # (auc - old_old) / (new_new - old_old)
        "max_nfr", "final_top1", "final_map",
        "seed_aucs": {"seeds": [...], "auc_top1": [...], "auc_map": [...]}   # optional, random runs: the
      }],                                                # AUCs of several random orders, the noise band
      "adapters": {                             # optional: adapters fitted without labels vs transformations
        "query": "new", "gallery": "old gallery through each map",   # what every row measures
        "old_old": {"top1", "map"}, "new_new": {"top1", "map"},
        "rows": [{"name", "label_free": bool, "top1", "map", "top1_vs_old_old", "map_vs_old_old",
                  "gain_top1", "gain_map",            # (x - old_old) / (new_new - old_old)
                  "above_old_old": bool,              # top-1 strictly above old/old
                  "gate": {...}}],                    # label-free rows: the held-out gate score (adapters.scores)
        "below_old_old": [name, ...]
      },
      "online": {...},                          # optional, written by the online (serving) evaluation
      "diagnostics": {str: float}               # optional, e.g. the demo's uncertainty-vs-error Spearmans
    }
"map" is mAP over the whole gallery (mAP@all); nfr is the share of queries correct at top-1 under
old/old and wrong at that beta.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from raybackfill.data.storage import read_bytes, write_bytes
from raybackfill.eval.curves import BackfillCurve, summarize
from raybackfill.eval.findings import Finding, findings, random_sd
from raybackfill.eval.metrics import RetrievalResult
from raybackfill.types import Policy

SCHEMA_VERSION = 1
AUC_DEFINITION = "mean over even grid"
ANCHOR_KEYS = ("top1", "top5", "map", "map_at_r")
ADAPTER_ROW_KEYS = ("name", "label_free", "top1", "map", "top1_vs_old_old", "above_old_old")
CURVE_KEYS = ("betas", "top1", "top5", "map", "nfr")
SUMMARY_KEYS = (
    "auc_top1",
    "auc_map",
    "auc_top1_trapezoid",
    "auc_map_trapezoid",
    "relative_gain_top1",
    "relative_gain_map",
    "max_nfr",
    "final_top1",
    "final_map",
)
TABLE_COLUMNS = {
    "auc_top1": "AUC top1",
    "auc_map": "AUC mAP",
    "auc_top1_trapezoid": "AUC top1 (trap.)",
    "auc_map_trapezoid": "AUC mAP (trap.)",
    "relative_gain_top1": "gain top1",
    "relative_gain_map": "gain mAP",
    "max_nfr": "max NFR",
    "final_top1": "final top1",
    "final_map": "final mAP",
}


@dataclass(frozen=True)
class Run:
    """One backfill curve: which compatibility method, which backfill order, which serving strategy."""

    method: str
    policy: str
    strategy: str
    curve: BackfillCurve
    # Random runs only: seed -> (auc_top1, auc_map) of that random order; ``curve`` is one of them.
    seed_aucs: Mapping[int, tuple[float, float]] | None = None


def _number(x: float) -> float | None:
    """JSON has no NaN: undefined values (e.g. a gain with equal anchors) become null."""
    x = float(x)
    return x if math.isfinite(x) else None


def run_entry(run: Run, old_old: RetrievalResult, new_new: RetrievalResult) -> dict:
    summary = summarize(run.curve, old_old, new_new)
    entry: dict = {"method": run.method, "policy": run.policy, "strategy": run.strategy}
    for key in CURVE_KEYS:
        entry[key] = [float(v) for v in getattr(run.curve, key)]
    for key in SUMMARY_KEYS:
        entry[key] = _number(getattr(summary, key))
    if run.seed_aucs:
        seeds = sorted(run.seed_aucs)
        entry["seed_aucs"] = {
            "seeds": seeds,
            "auc_top1": [float(run.seed_aucs[s][0]) for s in seeds],
            "auc_map": [float(run.seed_aucs[s][1]) for s in seeds],
        }
    return entry


def versus_random(report: Mapping) -> list[dict]:
    """Each priority order against its method's random orders: the gap in AUC and that gap in standard
    deviations of the random AUCs (z). One random permutation is a noisy baseline at a thousand queries; an
    order that truly helps should stand clear of the band, not merely above one draw."""
    rows = []
    for random_run in report["runs"]:
        spread = random_run.get("seed_aucs")
        if random_run["policy"] != Policy.RANDOM or not spread or len(spread["seeds"]) < 2:
            continue
        for run in report["runs"]:
            if run["method"] != random_run["method"] or run["policy"] == Policy.RANDOM:
                continue
            row: dict = {"method": run["method"], "policy": run["policy"], "random_seeds": len(spread["seeds"])}
            for key in ("auc_top1", "auc_map"):
                values = spread[key]
                mean, sd = sum(values) / len(values), random_sd(random_run, key)
                row[key] = run[key]
                row[f"{key}_random_mean"], row[f"{key}_random_sd"] = mean, sd
                row[f"{key}_z"] = _number((run[key] - mean) / sd) if sd is not None and sd > 0 else None
            rows.append(row)
    return rows


def build_report(anchors: Mapping[str, RetrievalResult], runs: Sequence[Run], online: Mapping | None = None) -> dict:
    """`anchors` needs "old_old" and "new_new"; all anchors must come from the same metric/protocol/queries."""
    for name in ("old_old", "new_new"):
        if name not in anchors:
            raise ValueError(f"anchors need '{name}' (got {sorted(anchors)})")
    ref = anchors["old_old"]
    for name, result in anchors.items():
        if (result.metric, result.protocol, result.n_queries) != (ref.metric, ref.protocol, ref.n_queries):
            raise ValueError(
                f"anchor {name} was evaluated with {result.metric}/{result.protocol}/{result.n_queries} queries, "
                f"old_old with {ref.metric}/{ref.protocol}/{ref.n_queries}"
            )
    report: dict = {
        "schema": SCHEMA_VERSION,
        "metric": ref.metric,
        "protocol": ref.protocol,
        "queries": {"evaluated": ref.n_queries, "dropped": ref.n_dropped},
        "auc": AUC_DEFINITION,
        "anchors": {name: {k: _number(getattr(r, k)) for k in ANCHOR_KEYS} for name, r in anchors.items()},
        "runs": [run_entry(run, anchors["old_old"], anchors["new_new"]) for run in runs],
    }
    if online is not None:
        report["online"] = dict(online)
    validate_report(report)
    return report


def _gain(value: float, old: float, new: float) -> float | None:
    return _number((value - old) / (new - old)) if new != old else None


def adapter_section(
    old_old: RetrievalResult,
    new_new: RetrievalResult,
    adapters: Mapping[str, tuple[RetrievalResult, Mapping]],
    references: Mapping[str, RetrievalResult],
) -> dict:
    """The report's ``adapters`` section: new-model queries against the old gallery sent through each map.

    Args:
        old_old: the old/old anchor every row is judged against (no upgrade at all).
        new_new: the new/new anchor (full re-embedding).
        adapters: maps fitted without labels: name -> (its evaluation, its gate record: ``score`` and ``fit``).
        references: maps trained with labels and the new model's classifier (FCT, FastFill): name -> evaluation.

    Returns:
        The section (see the module docstring); ``below_old_old`` names every map whose top-1 is not above
        old/old, so a reader sees at once which ones would serve worse than not upgrading.
    """
    for name, result in [*((n, r) for n, (r, _) in adapters.items()), *references.items(), ("new_new", new_new)]:
        if (result.metric, result.protocol, result.n_queries) != (old_old.metric, old_old.protocol, old_old.n_queries):
            raise ValueError(f"adapter row {name} was evaluated differently from old_old")
    oo, nn = old_old, new_new

    def row(name: str, result: RetrievalResult, label_free: bool) -> dict:
        return {
            "name": name,
            "label_free": label_free,
            "top1": _number(result.top1),
            "map": _number(result.map),
            "top1_vs_old_old": _number(result.top1 - oo.top1),
            "map_vs_old_old": _number(result.map - oo.map),
            "gain_top1": _gain(result.top1, oo.top1, nn.top1),
            "gain_map": _gain(result.map, oo.map, nn.map),
            "above_old_old": bool(result.top1 > oo.top1),
        }

    rows = [row(name, result, True) | {"gate": dict(record)} for name, (result, record) in adapters.items()]
    rows += [row(name, result, False) for name, result in references.items()]
    return {
        "query": "new",
        "gallery": "old gallery through each map",
        "old_old": {"top1": _number(oo.top1), "map": _number(oo.map)},
        "new_new": {"top1": _number(nn.top1), "map": _number(nn.map)},
        "rows": rows,
        "below_old_old": [r["name"] for r in rows if not r["above_old_old"]],
    }


def adapter_table(section: Mapping, markdown: bool = False) -> str:
    """The adapters section as a table: each map's top-1 / mAP against the old gallery it maps, its gap to
    old/old, its share of the old -> new gain and, for label-free ones, the gate's held-out recall@k."""
    rows = []
    for r in section["rows"]:
        score = r.get("gate", {}).get("score", {})
        recall = score.get("recall")
        rows.append(
            [
                r["name"],
                "none" if r["label_free"] else "labels + classifier",
                r["top1"],
                r["map"],
                "-" if r["top1_vs_old_old"] is None else f"{r['top1_vs_old_old']:+.3f}",
                r["gain_top1"],
                None if recall is None else float(recall),
                "above old/old" if r["above_old_old"] else "BELOW old/old",
            ]
        )
    header = ["map", "trained with", "top1", "mAP", "top1 - old/old", "gain top1", "gate recall@k", "verdict"]
    return render_table(header, rows, markdown)


def validate_report(report: Mapping) -> None:
    """Raise ValueError naming the first thing a reader of the schema would miss."""
    for key in ("metric", "protocol", "queries", "auc", "anchors", "runs"):
        if key not in report:
            raise ValueError(f"report: missing '{key}'")
    for name in ("old_old", "new_new"):
        missing = [k for k in ANCHOR_KEYS if k not in report["anchors"].get(name, {})]
        if missing:
            raise ValueError(f"report: anchors.{name} lacks {missing}")
    for i, run in enumerate(report["runs"]):
        missing = [k for k in ("method", "policy", "strategy", *CURVE_KEYS, *SUMMARY_KEYS) if k not in run]
        if missing:
            raise ValueError(f"report: run {i} lacks {missing}")
        lengths = {k: len(run[k]) for k in CURVE_KEYS}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"report: run {i} ({run['method']}/{run['policy']}) curve lengths differ: {lengths}")
    adapters = report.get("adapters")
    if adapters is not None:
        for key in ("old_old", "new_new", "rows", "below_old_old"):
            if key not in adapters:
                raise ValueError(f"report: adapters lacks '{key}'")
        for i, row in enumerate(adapters["rows"]):
            missing = [k for k in ADAPTER_ROW_KEYS if k not in row]
            if missing:
                raise ValueError(f"report: adapters row {i} lacks {missing}")


def save_report(report: Mapping, uri: str) -> str:
    """Write report.json (local path or s3://) after checking it against the schema."""
    validate_report(report)
    write_bytes(uri, (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
    return uri


def load_report(uri: str) -> dict:
    report = json.loads(read_bytes(uri))
    validate_report(report)
    return report


def _key(run: Mapping) -> tuple[str, str, str]:
    return run["method"], run["policy"], run["strategy"]


def merge_reports(reports: Sequence[Mapping]) -> dict:
    """One report from several over the same evaluation (e.g. one job per method): runs concatenated.

    Metric, protocol, query counts and shared anchors must agree; a run (method, policy, strategy) may
    appear once; at most one report may carry an online section. Diagnostics are joined like anchors: a
    name two reports share must have one value.
    """
    if not reports:
        raise ValueError("nothing to merge")
    for report in reports:
        validate_report(report)
    first = reports[0]
    merged: dict = {k: first[k] for k in ("schema", "metric", "protocol", "queries", "auc") if k in first}
    merged["anchors"], merged["runs"] = {}, []
    seen: set[tuple[str, str, str]] = set()
    onlines = [r["online"] for r in reports if "online" in r]
    for i, report in enumerate(reports):
        for key in ("metric", "protocol", "queries", "auc"):
            if report[key] != first[key]:
                raise ValueError(f"report {i} has {key}={report[key]!r}, report 0 has {first[key]!r}")
        for name, values in report["anchors"].items():
            if merged["anchors"].setdefault(name, values) != values:
                raise ValueError(f"report {i}: anchor {name} differs from an earlier report's")
        for name, value in report.get("diagnostics", {}).items():
            if merged.setdefault("diagnostics", {}).setdefault(name, value) != value:
                raise ValueError(f"report {i}: diagnostic {name} differs from an earlier report's")
        for run in report["runs"]:
            if _key(run) in seen:
                raise ValueError(f"report {i}: run {'/'.join(_key(run))} appears twice")
            seen.add(_key(run))
            merged["runs"].append(dict(run))
    if len(onlines) > 1:
        raise ValueError(f"{len(onlines)} reports carry an online section; merge keeps one")
    if onlines:
        merged["online"] = onlines[0]
    return merged


def _cell(value: float | str | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def render_table(header: Sequence[str], rows: Sequence[Sequence], markdown: bool = False) -> str:
    """Aligned plain-text table for the terminal, or a GitHub markdown table."""
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [all(row[i] is None or isinstance(row[i], float) for row in rows) for i in range(len(header))]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:>{w}}}" if num else f"{{:<{w}}}" for w, num in zip(widths, numeric, strict=True))
    lines = [fmt.format(*header), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*row) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _preamble(report: Mapping) -> str:
    q = report["queries"]
    return (
        f"metric {report['metric']}, protocol {report['protocol']}, {q['evaluated']} queries "
        f"({q['dropped']} dropped: no relevant gallery item); AUC = {report['auc']}"
    )


def summary_table(report: Mapping, markdown: bool = False) -> str:
    """Anchors table, then one row per run with its AUCs, gains, max NFR and final metrics; then, where the
    report has them, the orders judged against random ones and the diagnostics."""
    anchors = render_table(
        ["anchor", "top1", "top5", "mAP", "mAP@R"],
        [[name, *(values[k] for k in ANCHOR_KEYS)] for name, values in report["anchors"].items()],
        markdown,
    )
    runs = render_table(
        ["method", "policy", "strategy", *TABLE_COLUMNS.values()],
        [[*_key(run), *(run[k] for k in TABLE_COLUMNS)] for run in report["runs"]],
        markdown,
    )
    text = f"{_preamble(report)}\n\n{anchors}\n\n{runs}"
    rows = versus_random(report)
    if rows:
        versus = render_table(
            ["method", "policy", "AUC top1", "random top1", "z top1", "AUC mAP", "random mAP", "z mAP"],
            [
                [r["method"], r["policy"]]
                + [
                    cell
                    for key in ("auc_top1", "auc_map")
                    for cell in (
                        r[key],
                        f"{_cell(r[f'{key}_random_mean'])} ± {_cell(r[f'{key}_random_sd'])}",
                        "-" if r[f"{key}_z"] is None else f"{r[f'{key}_z']:+.1f}",
                    )
                ]
                for r in rows
            ],
            markdown,
        )
        text += f"\n\norders against {rows[0]['random_seeds']} random orders (mean ± sd; z in sd):\n\n{versus}"
    adapters = report.get("adapters")
    if adapters:
        oo, nn = adapters["old_old"], adapters["new_new"]
        versus = " vs FCT with classifier" if any(not r["label_free"] for r in adapters["rows"]) else ""
        text += (
            f"\n\nadapters (label-free){versus}: new query / old gallery through each map "
            f"(old/old top1 {_cell(oo['top1'])}, new/new {_cell(nn['top1'])}; gain = share of the old -> new gap):"
            f"\n\n{adapter_table(adapters, markdown)}"
        )
    diagnostics = report.get("diagnostics")
    if diagnostics:
        table = render_table(["diagnostic", "value"], [[k, float(v)] for k, v in diagnostics.items()], markdown)
        text += f"\n\n{table}"
    directions = findings_table([report], markdown=markdown)
    text += f"\n\nthe papers' directions (z: the gap in standard errors of its measurement):\n\n{directions}"
    return text


def findings_table(reports: Sequence[Mapping], labels: Sequence[str] | None = None, markdown: bool = False) -> str:
    """One row per finding of :func:`raybackfill.eval.findings.findings`, one column per report: the
    verdict and z (for a single report, also the two figures compared)."""
    per_report = [findings(report) for report in reports]
    labels = list(labels) if labels is not None else [""] * len(reports)

    def cell(f: Finding) -> str:
        z = "" if f.z is None else f" (z {f.z:+.1f})"
        return f"{f.verdict.value}{z}"

    if len(reports) == 1:
        rows = [[f.claim, f"{f.a_label} {_cell(f.a)}", f"{f.b_label} {_cell(f.b)}", cell(f)] for f in per_report[0]]
        return render_table(["finding", "measured", "against", "verdict"], rows, markdown)
    rows = [[group[0].claim, *(cell(f) for f in group)] for group in zip(*per_report, strict=True)]
    return render_table(["finding", *labels], rows, markdown)


def compare_reports(
    reports: Mapping[str, Mapping],
    keys: Sequence[str] = ("auc_top1", "auc_map", "max_nfr"),
    markdown: bool = False,
) -> str:
    """Several reports side by side (e.g. datasets, seeds, code versions): `keys` per report per run."""
    unknown = [k for k in keys if k not in TABLE_COLUMNS]
    if unknown:
        raise ValueError(f"unknown summary keys {unknown}; choose from {list(TABLE_COLUMNS)}")
    lines = []
    for label, report in reports.items():
        validate_report(report)
        oo, nn = report["anchors"]["old_old"], report["anchors"]["new_new"]
        lines.append(
            f"{label}: {_preamble(report)}; old/old top1 {_cell(oo['top1'])} mAP {_cell(oo['map'])}, "
            f"new/new top1 {_cell(nn['top1'])} mAP {_cell(nn['map'])}"
        )
    by_label = {label: {_key(run): run for run in report["runs"]} for label, report in reports.items()}
    order = list(dict.fromkeys(key for runs in by_label.values() for key in runs))
    header = ["method", "policy", "strategy"] + [f"{label}: {TABLE_COLUMNS[k]}" for label in reports for k in keys]
    rows = [[*key, *(by_label[label].get(key, {}).get(k) for label in reports for k in keys)] for key in order]
    return "\n".join(lines) + "\n\n" + render_table(header, rows, markdown)
