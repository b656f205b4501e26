"""The demo's online phase on tiny data: a live index served while the FastFill backfill runs into it."""

import pytest

from raybackfill.demo.configs import DemoConfig, DemoScale, Fit, OnlineConfig
from raybackfill.demo.online import run_online
from raybackfill.demo.pipeline import run_demo
from raybackfill.eval.plots import online_figure
from raybackfill.index.router import connect

ONE = Fit(epochs=1, batch_size=32, lr=1e-3)
TINY = DemoScale(
    classes=4, per_class=10, image_size=16, width=4, embedding_dim=8, side_info_dim=4, old=ONE, new=ONE,
    side_info=ONE, transformation=ONE, reverse=ONE, hidden_dim=8, mixer_dim=16, beta_points=3, backbone_lrs=(1e-3,),
)  # fmt: skip


def test_a_paced_live_backfill_under_queries_reports_items_queries_and_no_errors(ray_cluster, tmp_path):
    config = DemoConfig(out=str(tmp_path / "demo"), scale=TINY, old_classes="0-1", seed=1, require_learning=False)
    online = OnlineConfig(max_probes=8, pause_s=0.0, tiers=2, min_seconds=4.0, batch_size=3)
    report = run_demo(config, online=lambda artifacts: run_online(artifacts, online))
    assert report["metric"] == "cosine" and "diagnostics" not in report
    assert {r["policy"] for r in report["runs"] if r["method"] == "fastfill"} == {"uncertainty", "random", "entropy"}
    section = report["online"]
    gallery = 4 * 10 * 3 // 10  # the gallery split holds 30% of the rows
    assert section["items"] == 2 * gallery  # every item transformed (instant phase), then re-embedded
    assert section["max_rate"] == pytest.approx(2 * gallery / 4.0)
    assert section["seconds"] >= 4.0  # paced: the two phases take at least min_seconds together
    assert section["query_errors"] == 0 and section["queries"] > 0
    assert section["items_per_s"] == pytest.approx(section["items"] / section["seconds"])
    assert [p["name"] for p in section["phases"]][-2:] == ["instant", "backfill"]
    readings = section["live_readings"]
    assert all(0 <= r["top1"] <= 1 for r in readings)
    # The client saw the gallery part transformed and part re-embedded, as separate shares that add up to <= 1.
    transformed, new = [r["fraction_transformed"] for r in readings], [r["fraction_new"] for r in readings]
    assert all(t + n <= 1 + 1e-9 for t, n in zip(transformed, new, strict=True))
    assert any(0 < t < 1 for t in transformed) and any(0 < n < 1 for n in new), "both shares rose step by step"
    assert len(online_figure(section).axes[1].lines) == 2  # transformed and re-embedded, each its own line
    with pytest.raises(ValueError, match="no index named"):
        connect("raybackfill-demo")  # the demo's index is gone


def test_online_config_checks_its_pacing_and_names():
    assert OnlineConfig(policy="entropy").policy == "entropy"
    with pytest.raises(ValueError, match="min_seconds must be positive"):
        OnlineConfig(min_seconds=0)
    with pytest.raises(ValueError, match="unknown policy 'fancy'"):
        OnlineConfig(policy="fancy")
