"""Backfill-curve figure from a report dict: top-1 and mAP against the backfilled fraction.

Drawn from report.json (not from live objects) so a figure can be redrawn from any saved report. Uses
matplotlib's Agg canvas directly: no pyplot global state, no display needed on cluster nodes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from raybackfill.data.io import write_bytes
from raybackfill.eval.report import validate_report

PANELS = (("top1", "CMC top-1"), ("map", "mAP@all"))
ANCHORS = (("old_old", "old/old", "0.3"), ("new_new", "new/new", "0.0"))


def curve_figure(report: Mapping) -> Figure:
    """Two panels (top-1, mAP); one line per run, old/old and new/new as dashed horizontal lines."""
    validate_report(report)
    fig = Figure(figsize=(13, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (key, title) in zip(fig.subplots(1, 2), PANELS, strict=True):
        for run in report["runs"]:
            label = f"{run['method']}/{run['policy']} ({run['strategy']})"
            ax.plot(run["betas"], run[key], marker="o", markersize=3, label=label)
        for name, label, color in ANCHORS:
            value = report["anchors"][name][key]
            if value is not None:
                ax.axhline(value, linestyle="--", color=color, linewidth=1, label=label)
        ax.set_xlabel("backfilled fraction of the gallery")
        ax.set_ylabel(title)
        ax.set_xlim(0, 1)
        ax.set_title(f"{title} ({report['metric']}, {report['protocol']})")
        ax.grid(alpha=0.3)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    return fig


def plot_curves(report: Mapping, uri: str) -> str:
    """Write the figure as PNG (local path or s3://) and return where it went."""
    buf = io.BytesIO()
    curve_figure(report).savefig(buf, format="png", dpi=120)
    write_bytes(uri, buf.getvalue())
    return uri
