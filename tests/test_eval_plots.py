"""The curve figure: a real PNG, two panels, one line per run plus the two anchor lines."""

import numpy as np
import pytest

from raybackfill.eval.curves import BackfillCurve
from raybackfill.eval.metrics import RetrievalResult
from raybackfill.eval.plots import curve_figure, online_figure, plot_curves, plot_online
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


def test_online_figure_plots_live_quality_and_the_new_space_share_over_time(tmp_path):
    readings = [
        {"t": t, "phase": "backfill", "fraction_new": t / 4, "top1": 0.4 + t / 20, "map_at_k": 0.2} for t in range(5)
    ]
    online = {
        "method": "fastfill",
        "policy": "uncertainty",
        "k": 10,
        "queries": 50,
        "query_errors": 0,
        "live_readings": readings,
    }
    fig = online_figure(online)
    live, share = fig.axes
    np.testing.assert_allclose(live.lines[0].get_ydata(), [0.4, 0.45, 0.5, 0.55, 0.6])
    np.testing.assert_allclose(share.lines[0].get_ydata(), [0, 0.25, 0.5, 0.75, 1])
    assert "0 errors" in live.get_title()
    path = plot_online(online, str(tmp_path / "online.png"))
    with open(path, "rb") as png:
        assert png.read(8) == PNG_SIGNATURE


def test_online_figure_draws_the_transformed_and_the_re_embedded_shares_apart():
    # The instant phase fills the transformed share while nothing is re-embedded yet; the backfill then moves
    # items from transformed to new.
    shares = [(0.0, 0.0), (0.5, 0.0), (1.0, 0.0), (0.6, 0.4), (0.0, 1.0)]
    readings = [{"t": t, "phase": "backfill", "fraction_transformed": a, "fraction_new": b, "top1": 0.5,
                 "map_at_k": 0.3} for t, (a, b) in enumerate(shares)]  # fmt: skip
    share = online_figure({"live_readings": readings}).axes[1]
    transformed, new = share.lines
    np.testing.assert_allclose(transformed.get_ydata(), [a for a, _ in shares])
    np.testing.assert_allclose(new.get_ydata(), [b for _, b in shares])
    assert (transformed.get_label(), new.get_label()) == ("fraction transformed", "fraction re-embedded")


def test_online_figure_without_readings_is_refused():
    with pytest.raises(ValueError, match="no live_readings"):
        online_figure({"queries": 0})


def test_runs_share_a_colour_per_method_and_a_line_style_per_order():
    betas = np.linspace(0, 1, 3)
    curve = BackfillCurve(betas, betas, betas, betas, betas * 0)
    runs = [
        Run(m, p, "compatible", curve)
        for m, p in [("fastfill", "uncertainty"), ("fastfill", "random"), ("fct", "random")]
    ]
    anchor = RetrievalResult("cosine", "disjoint", 0.5, 0.5, 0.2, 0.2, np.ones(2, bool), np.ones(2, bool), np.ones(2))
    ax = curve_figure(build_report({"old_old": anchor, "new_new": anchor}, runs)).axes[0]
    unc, rand, fct = ax.lines[:3]
    assert unc.get_color() == rand.get_color() != fct.get_color()
    assert unc.get_linestyle() != rand.get_linestyle() == fct.get_linestyle()
    assert "--" not in {line.get_linestyle() for line in (unc, rand, fct)}  # dashed = the anchors
