"""The demo's online phase on tiny data: a live index served while the FastFill backfill runs into it."""

import pytest

from raybackfill.demo.online import OnlineConfig, run_online
from raybackfill.demo.pipeline import DemoConfig, DemoScale, Fit, run_offline
from raybackfill.index.router import connect

ONE = Fit(epochs=1, batch_size=32, lr=1e-3)
TINY = DemoScale(
    classes=4, per_class=10, image_size=16, width=4, embedding_dim=8, side_info_dim=4, old=ONE, new=ONE,
    side_info=ONE, transformation=ONE, reverse=ONE, hidden_dim=8, mixer_dim=16, beta_points=3, backbone_lrs=(1e-3,),
)  # fmt: skip


def test_live_backfill_under_queries_reports_items_queries_and_no_errors(ray_cluster, tmp_path):
    config = DemoConfig(out=str(tmp_path / "demo"), scale=TINY, old_classes="0-1", seed=1, require_learning=False)
    online = OnlineConfig(max_probes=8, pause_s=0.0, tiers=2)
    report = run_offline(config, online=lambda artifacts: run_online(artifacts, online, log=print), log=print)
    section = report["online"]
    gallery = 4 * 10 * 3 // 10  # the gallery split holds 30% of the rows
    assert section["items"] == 2 * gallery  # every item transformed (instant phase), then re-embedded
    assert section["query_errors"] == 0 and section["queries"] > 0
    assert section["items_per_s"] == pytest.approx(section["items"] / section["seconds"])
    assert [p["name"] for p in section["phases"]][-2:] == ["instant", "backfill"]
    assert section["live_readings"] and all(0 <= r["top1"] <= 1 for r in section["live_readings"])
    with pytest.raises(ValueError, match="no index named"):
        connect("raybackfill-demo")  # the demo's index is gone
