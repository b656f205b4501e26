"""The curve figure: a real PNG, two panels, one line per run plus the two anchor lines."""

import numpy as np

from raybackfill.eval.curves import BackfillCurve
from raybackfill.eval.metrics import RetrievalResult
from raybackfill.eval.plots import curve_figure, plot_curves
from raybackfill.eval.report import Run, build_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def report():
    def anchor(top1):
        return RetrievalResult(
            "cosine", "disjoint", top1, top1, top1 / 2, top1 / 2, np.ones(2, bool), np.ones(2, bool), np.ones(2)
        )

    betas = np.linspace(0, 1, 5)
    methods = [("fct", "compatible"), ("bct", "compatible"), ("rank_merge", "rank_merge")]
    runs = [
        Run(method, "random", strategy, BackfillCurve(betas, betas * k, betas, betas * k / 2, betas * 0))
        for k, (method, strategy) in enumerate(methods)
    ]
    return build_report({"old_old": anchor(0.3), "new_new": anchor(0.7)}, runs)


def test_figure_has_top1_and_map_panels_with_one_line_per_run_and_two_anchors():
    fig = curve_figure(report())
    assert len(fig.axes) == 2
    for ax, key in zip(fig.axes, ("top-1", "mAP"), strict=True):
        assert key in ax.get_ylabel()
        assert len(ax.lines) == 3 + 2
        dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
        assert len(dashed) == 2
    np.testing.assert_allclose(fig.axes[1].lines[2].get_ydata(), np.linspace(0, 1, 5))  # rank_merge mAP = beta


def test_plot_writes_a_png_and_returns_its_path(tmp_path):
    path = plot_curves(report(), str(tmp_path / "plots" / "curves.png"))
    data = (tmp_path / "plots" / "curves.png").read_bytes()
    assert path == str(tmp_path / "plots" / "curves.png")
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
