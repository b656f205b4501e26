"""Backfill curves: endpoints, equality with the explicit two-part gallery at every beta, AUC forms, gains."""

import numpy as np
import pytest

from raybackfill.eval.curves import (
    BackfillCurve,
    BackfillSpaces,
    auc_mean,
    auc_trapezoid,
    backfill_curve,
    even_betas,
    n_backfilled,
    parts_at,
    relative_gain,
    summarize,
)
from raybackfill.eval.metrics import EvalConfig, RetrievalResult, evaluate, evaluate_parts, negative_flip_rate


def integer_vectors(rng, n, dim=6):
    """Small integers: exact float32 scores under L2, so curve and reference agree bit for bit."""
    return rng.integers(-3, 4, size=(n, dim)).astype(np.float32)


@pytest.fixture(params=["disjoint", "leave_one_out"])
def setup(request):
    protocol = request.param
    rng = np.random.default_rng(21)
    n_gallery = 37  # not a multiple of the grid: floor(beta * N) repeats counts
    g_labels = rng.integers(0, 4, n_gallery)
    if protocol == "leave_one_out":
        q_labels, n_queries = g_labels, n_gallery
    else:
        n_queries = 25
        q_labels = rng.integers(0, 4, n_queries)
    vec = {name: integer_vectors(rng, n) for name, n in [("old_q", n_queries), ("new_q", n_queries)]}
    vec |= {name: integer_vectors(rng, n_gallery) for name in ("old_g", "new_g", "transformed_g")}
    if protocol == "leave_one_out":  # one set: queries are the gallery items
        vec["old_q"], vec["new_q"] = vec["old_g"], vec["new_g"]
    config = EvalConfig(metric="l2", protocol=protocol, block_size=10)
    old_old = evaluate(vec["old_q"], vec["old_g"], q_labels, g_labels, config)
    new_new = evaluate(vec["new_q"], vec["new_g"], q_labels, g_labels, config)
    spaces = {
        "old": BackfillSpaces.old(vec["old_q"], vec["old_g"]),
        "compatible": BackfillSpaces.compatible(vec["new_q"], vec["transformed_g"], vec["new_g"]),
        "rank_merge": BackfillSpaces.rank_merge(vec["old_q"], vec["old_g"], vec["new_q"], vec["new_g"]),
    }
    return dict(
        config=config, q_labels=q_labels, g_labels=g_labels, old_old=old_old, new_new=new_new, spaces=spaces,
        order=rng.permutation(n_gallery),
    )  # fmt: skip


def curve_of(s, strategy, **kwargs):
    return backfill_curve(
        s["spaces"][strategy], s["order"], s["q_labels"], s["g_labels"], s["old_old"].correct_top1,
        config=s["config"], **kwargs,
    )  # fmt: skip


def test_endpoints_are_old_old_and_new_new(setup):
    oo, nn = setup["old_old"], setup["new_new"]
    old, merge, compat = (curve_of(setup, k) for k in ("old", "rank_merge", "compatible"))
    for curve in (old, merge):
        assert (curve.top1[0], curve.top5[0], curve.map[0], curve.nfr[0]) == (oo.top1, oo.top5, oo.map, 0.0)
    np.testing.assert_array_equal(old.top1, np.full(21, oo.top1))
    np.testing.assert_array_equal(old.nfr, np.zeros(21))
    for curve in (merge, compat):
        assert (curve.top1[-1], curve.top5[-1], curve.map[-1]) == (nn.top1, nn.top5, nn.map)
        assert curve.nfr[-1] == negative_flip_rate(oo.correct_top1, nn.correct_top1)


@pytest.mark.parametrize("strategy", ["compatible", "rank_merge"])
def test_every_beta_equals_the_explicit_two_part_gallery(setup, strategy):
    curve = curve_of(setup, strategy)
    spaces, config = setup["spaces"][strategy], setup["config"]
    for i, beta in enumerate(curve.betas):
        result = evaluate_parts(parts_at(spaces, setup["order"], beta), setup["q_labels"], setup["g_labels"], config)
        assert (curve.top1[i], curve.top5[i], curve.map[i]) == (result.top1, result.top5, result.map)
        assert curve.nfr[i] == negative_flip_rate(setup["old_old"].correct_top1, result.correct_top1)


def test_block_size_and_custom_grid_do_not_change_values(setup):
    betas = np.array([0.0, 0.3, 0.31, 1.0])
    curve = curve_of(setup, "rank_merge", betas=betas)
    setup["config"] = EvalConfig(metric="l2", protocol=setup["config"].protocol, block_size=3)
    small = curve_of(setup, "rank_merge", betas=betas)
    full = curve_of(setup, "rank_merge")
    for key in ("top1", "top5", "map", "nfr"):
        np.testing.assert_array_equal(getattr(curve, key), getattr(small, key))
        assert getattr(curve, key)[0] == getattr(full, key)[0] and getattr(curve, key)[-1] == getattr(full, key)[-1]
    np.testing.assert_array_equal(curve.betas, betas)


def test_parts_at_puts_the_first_floor_beta_n_of_the_order_in_the_new_space():
    order = np.array([4, 0, 3, 1, 2])
    old, new = np.zeros((5, 2)), np.ones((5, 2))
    spaces = BackfillSpaces.rank_merge(np.zeros((1, 2)), old, np.ones((1, 2)), new)
    before, after = parts_at(spaces, order, 0.5)  # floor(2.5) = 2 items backfilled
    np.testing.assert_array_equal(after.positions, [0, 4])
    np.testing.assert_array_equal(before.positions, [1, 2, 3])
    assert (after.gallery == 1).all() and (before.gallery == 0).all()


def test_backfilled_count_is_floor_of_beta_times_n_without_float_noise():
    assert [n_backfilled(b, 100) for b in (0.0, 0.29, 0.5, 0.999, 1.0)] == [0, 29, 50, 99, 100]
    assert n_backfilled(0.5, 5) == 2
    assert n_backfilled(0.7, 10) == 7
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        n_backfilled(1.2, 10)


def test_bad_order_and_reference_are_rejected(setup):
    spaces, q_labels, g_labels = setup["spaces"]["rank_merge"], setup["q_labels"], setup["g_labels"]
    ref = setup["old_old"].correct_top1
    bad_order = np.zeros(len(g_labels), dtype=int)
    with pytest.raises(ValueError, match="permutation"):
        backfill_curve(spaces, bad_order, q_labels, g_labels, ref, config=setup["config"])
    with pytest.raises(ValueError, match="evaluated queries need one each"):
        backfill_curve(spaces, setup["order"], q_labels, g_labels, ref[:-1], config=setup["config"])
    with pytest.raises(ValueError, match="strictly increasing"):
        curve_of(setup, "old", betas=np.array([0.0, 0.5, 0.5, 1.0]))


def test_auc_mean_over_even_grid_and_trapezoid_on_hand_made_numbers():
    betas, values = np.array([0.0, 0.5, 1.0]), np.array([0.2, 0.4, 0.9])
    assert auc_mean(betas, values) == pytest.approx(0.5)
    assert auc_trapezoid(betas, values) == pytest.approx(0.5 * (0.2 + 0.4) / 2 + 0.5 * (0.4 + 0.9) / 2)
    uneven = np.array([0.0, 0.25, 1.0])
    assert auc_trapezoid(uneven, np.array([0.0, 1.0, 1.0])) == pytest.approx(0.25 * 0.5 + 0.75)
    with pytest.raises(ValueError, match="evenly spaced"):
        auc_mean(uneven, values)
    np.testing.assert_allclose(even_betas(5), [0, 0.25, 0.5, 0.75, 1])
    assert len(even_betas()) == 21


def test_relative_gain_is_share_of_the_old_to_new_gap():
    assert relative_gain(0.5, old_old=0.3, new_new=0.7) == pytest.approx(0.5)
    assert relative_gain(0.3, old_old=0.3, new_new=0.7) == 0.0
    assert relative_gain(0.2, old_old=0.3, new_new=0.7) == pytest.approx(-0.25)
    assert np.isnan(relative_gain(0.5, old_old=0.4, new_new=0.4))


def _anchor(top1, map_):
    return RetrievalResult("cosine", "disjoint", top1, top1, map_, map_, np.ones(1, bool), np.ones(1, bool), np.ones(1))


def test_summary_of_a_hand_made_curve():
    curve = BackfillCurve(
        betas=np.array([0.0, 0.5, 1.0]),
        top1=np.array([0.3, 0.6, 0.9]),
        top5=np.array([0.5, 0.7, 0.95]),
        map=np.array([0.1, 0.2, 0.6]),
        nfr=np.array([0.0, 0.08, 0.05]),
    )
    s = summarize(curve, old_old=_anchor(0.3, 0.1), new_new=_anchor(0.9, 0.6))
    assert s.auc_top1 == pytest.approx(0.6)
    assert s.auc_map == pytest.approx(0.3)
    assert s.auc_top1_trapezoid == pytest.approx(0.6)
    assert s.auc_map_trapezoid == pytest.approx(0.25 * (0.1 + 0.2) + 0.25 * (0.2 + 0.6))
    assert s.relative_gain_top1 == pytest.approx(0.5)
    assert s.relative_gain_map == pytest.approx(0.4)
    assert (s.max_nfr, s.final_top1, s.final_map) == (0.08, 0.9, 0.6)
