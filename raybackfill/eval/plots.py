"""Figures from a report dict: backfill curves (top-1 and mAP against the backfilled fraction) and, when
the report has an online section, the live quality a query client saw while the backfill ran.

Drawn from report.json (not from live objects) so a figure can be redrawn from any saved report. Uses
matplotlib's Agg canvas directly: no pyplot global state, no display needed on cluster nodes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from raybackfill.data.storage import write_bytes
from raybackfill.eval.chain import COMPOSED_FIRST
from raybackfill.eval.report import validate_report
from raybackfill.types import Policy

PANELS = (("top1", "CMC top-1"), ("map", "mAP@all"))
ANCHORS = (("old_old", "old/old", "0.3"), ("new_new", "new/new", "0.0"))
LINE_STYLES = ("-", "-.", ":", (0, (5, 1)))  # "--" is kept for the anchors


def curve_figure(report: Mapping) -> Figure:
    """Two panels (top-1, mAP); one line per run, old/old and new/new as dashed horizontal lines."""
    validate_report(report)
    fig = Figure(figsize=(13, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    # One colour per method and one line style per order, so that a dozen runs stay tellable apart.
    methods = list(dict.fromkeys(run["method"] for run in report["runs"]))
    orders = list(dict.fromkeys(run["policy"] for run in report["runs"]))
    for ax, (key, title) in zip(fig.subplots(1, 2), PANELS, strict=True):
        for run in report["runs"]:
            label = f"{run['method']}/{run['policy']} ({run['strategy']})"
            color = f"C{methods.index(run['method']) % 10}"
            style = LINE_STYLES[orders.index(run["policy"]) % len(LINE_STYLES)]
            ax.plot(run["betas"], run[key], color=color, linestyle=style, marker="o", markersize=3, label=label)
        _anchor_lines(ax, ANCHORS, report["anchors"], key)
        ax.set_xlabel("backfilled fraction of the gallery")
        ax.set_ylabel(title)
        ax.set_xlim(0, 1)
        ax.set_title(f"{title} ({report['metric']}, {report['protocol']})")
        ax.grid(alpha=0.3)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    return fig


def _anchor_lines(ax, lines, anchors: Mapping, key: str) -> None:
    """A dashed horizontal line per anchor (name, label, colour) that has a value for ``key``."""
    for name, label, color in lines:
        value = anchors[name][key]
        if value is not None:
            ax.axhline(value, linestyle="--", color=color, linewidth=1, label=label)


def plot_curves(report: Mapping, uri: str) -> str:
    """Write the curve figure as PNG (local path or s3://) and return where it went."""
    return _save_png(curve_figure(report), uri)


CHAIN_ANCHOR_LINES = (("v1_v1", "v1/v1", "0.6"), ("v2_v2", "v2/v2", "0.3"), ("v3_v3", "v3/v3", "0.0"))
CHAIN_ORDER_STYLES = {Policy.UNCERTAINTY: "-", Policy.RANDOM: "-.", COMPOSED_FIRST: ":"}


def chain_figure(chain: Mapping) -> Figure:
    """A chained upgrade's v3 backfill (the report's ``chain`` section): top-1 and mAP of v3 queries against
    the share of the gallery v3 re-embedded, one colour per v2 state (stopped, finished) and one line style per
    order, v1/v1, v2/v2 and v3/v3 as dashed lines; a third panel shows what serves the gallery along the
    stopped variant's uncertainty order (phi3, h23(phi2), the composed h23(h12(phi1)))."""
    variants = chain.get("variants") or []
    if not variants:
        raise ValueError("the chain section has no variants to plot")
    fig = Figure(figsize=(16, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, (key, title) in zip(axes[:2], PANELS, strict=True):
        for i, variant in enumerate(variants):
            for run in variant["runs"]:
                ax.plot(run["betas"], run[key], color=f"C{i % 10}", marker="o", markersize=3,
                        linestyle=CHAIN_ORDER_STYLES.get(run["policy"], "--"),
                        label=f"{variant['name']}, v3 order {run['policy']}")  # fmt: skip
        _anchor_lines(ax, CHAIN_ANCHOR_LINES, chain["anchors"], key)
        ax.set_xlabel("fraction of the gallery re-embedded by v3")
        ax.set_ylabel(title)
        ax.set_xlim(0, 1)
        ax.set_title(f"{title}, v3 queries (v2 stopped at {chain['v2_fraction']:.0%})")
        ax.grid(alpha=0.3)
    first = variants[0]
    served = first["served"]
    betas = first["runs"][0]["betas"]
    axes[2].stackplot(betas, *served.values(), labels=list(served), alpha=0.7)
    axes[2].set_xlabel("fraction of the gallery re-embedded by v3")
    axes[2].set_ylabel("share of the gallery served as")
    axes[2].set_xlim(0, 1)
    axes[2].set_ylim(0, 1)
    axes[2].set_title(f"{first['name']}: what serves each item")
    axes[2].legend(loc="upper right", fontsize="small")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    return fig


def plot_chain(chain: Mapping, uri: str) -> str:
    """Write the chain figure as PNG (local path or s3://) and return where it went."""
    return _save_png(chain_figure(chain), uri)


def online_figure(online: Mapping) -> Figure:
    """Live top-1 and mAP@k of the query client against time, with the shares of the gallery transformed
    (served from the forward transformation) and re-embedded (by the new model) on a second axis: whether
    quality rose as the backfill moved items, and when."""
    readings = online.get("live_readings") or []
    if not readings:
        raise ValueError("the online section has no live_readings to plot")
    t = [r["t"] for r in readings]
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(t, [r["top1"] for r in readings], marker=".", label="live top-1")
    ax.plot(t, [r["map_at_k"] for r in readings], marker=".", label=f"live mAP@{online.get('k', 'k')}")
    ax.set_xlabel("seconds since the backfill started")
    ax.set_ylabel("live quality")
    ax.grid(alpha=0.3)
    share = ax.twinx()
    if any("fraction_transformed" in r for r in readings):
        transformed = [r.get("fraction_transformed", 0.0) for r in readings]
        share.plot(t, transformed, color="0.6", linestyle="--", label="fraction transformed")
    share.plot(t, [r["fraction_new"] for r in readings], color="0.3", linestyle=":", label="fraction re-embedded")
    share.set_ylabel("fraction of the gallery")
    share.set_ylim(0, 1.05)
    ax.set_title(
        f"{online.get('method', '')}/{online.get('policy', '')} backfill under live queries "
        f"({online.get('queries', 0)} queries, {online.get('query_errors', 0)} errors)"
    )
    handles = ax.get_legend_handles_labels()[0] + share.get_legend_handles_labels()[0]
    ax.legend(handles, [str(h.get_label()) for h in handles], loc="lower right", fontsize="small")
    return fig


def plot_online(online: Mapping, uri: str) -> str:
    """Write the live-quality figure as PNG (local path or s3://) and return where it went."""
    return _save_png(online_figure(online), uri)


def _save_png(fig: Figure, uri: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    write_bytes(uri, buf.getvalue())
    return uri
