"""The chained upgrade v1 -> v2 -> v3: the pure state functions against hand-computed values, the whole chain's
curves against a brute-force item-by-item reference, and the section end to end into report.json, report.md,
the PNG and the demo's summary (tiny synthetic embeddings, no training)."""

import json
import math

import numpy as np
import pytest

from raybackfill.demo.summary import summary
from raybackfill.eval.chain import (
    CHAIN_ANCHORS,
    COMPOSED_FIRST,
    SERVED_COMPOSED,
    SERVED_V3,
    SERVED_VIA_V2,
    ChainConfig,
    ChainVectors,
    composed_first_order,
    evaluate_chain,
    gallery_at,
    generation,
    moved_mask,
    pooled_z,
    provenance_shares,
    variant_name,
)
from raybackfill.eval.curves import BackfillSpaces, backfill_curve
from raybackfill.eval.metrics import EvalConfig, evaluate
from raybackfill.eval.offline import CHAIN_PLOT_FILE, MARKDOWN_FILE, REPORT_FILE, output_files, write_outputs
from raybackfill.eval.report import Run, build_report

# ---- pure functions vs hand-computed values ------------------------------------------------------------------


def test_moved_mask_takes_the_floor_of_the_fraction_in_order():
    order = np.array([3, 0, 4, 1, 2])
    assert moved_mask(order, 0.0).tolist() == [False] * 5
    assert moved_mask(order, 0.5).tolist() == [True, False, False, True, False]  # floor(2.5) = 2: items 3, 0
    assert moved_mask(order, 0.6).tolist() == [True, False, False, True, True]  # 3 items: 3, 0, 4
    assert moved_mask(order, 1.0).tolist() == [True] * 5


def test_moved_mask_refuses_a_non_permutation_and_a_bad_fraction():
    with pytest.raises(ValueError, match="permutation"):
        moved_mask(np.array([0, 0, 1]), 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        moved_mask(np.array([0, 1]), 1.5)


def test_generation_picks_rows_by_the_mask_and_checks_shapes():
    moved = np.array([True, False, True])
    phi2 = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    h12 = np.array([[-1.0, 0.0], [-2.0, 0.0], [-3.0, 0.0]])
    assert generation(moved, phi2, h12).tolist() == [[1.0, 1.0], [-2.0, 0.0], [3.0, 3.0]]
    with pytest.raises(ValueError, match="mask"):
        generation(moved[:2], phi2, h12)
    with pytest.raises(ValueError, match="equally shaped"):
        generation(moved, phi2, h12[:, :1])


def test_gallery_at_moves_the_first_items_of_the_v3_order():
    start, final = np.zeros((4, 1)), np.arange(1.0, 5.0)[:, None]
    order = np.array([2, 3, 0, 1])
    assert gallery_at(start, final, order, 0.0).ravel().tolist() == [0, 0, 0, 0]
    assert gallery_at(start, final, order, 0.5).ravel().tolist() == [0, 0, 3, 4]
    assert gallery_at(start, final, order, 0.75).ravel().tolist() == [1, 0, 3, 4]
    assert gallery_at(start, final, order, 1.0).ravel().tolist() == [1, 2, 3, 4]


def test_provenance_shares_by_hand():
    # v2 moved items 0 and 1; v3 re-embeds 1, 2, 3, 0 in that order.
    v2_moved = np.array([True, True, False, False])
    shares = provenance_shares(v2_moved, np.array([1, 2, 3, 0]), np.array([0.0, 0.25, 0.5, 1.0]))
    assert shares[SERVED_V3] == [0.0, 0.25, 0.5, 1.0]
    assert shares[SERVED_VIA_V2] == [0.5, 0.25, 0.25, 0.0]  # item 0 waits until the end
    assert shares[SERVED_COMPOSED] == [0.5, 0.5, 0.25, 0.0]  # items 2, 3 go straight from h23(h12) to phi3


def test_composed_first_order_by_hand():
    # items 1 and 3 were not re-embedded by v2: they go first, by uncertainty; a tie falls to the lower id
    moved = np.array([True, False, True, False, True])
    u = np.array([5.0, 1.0, 7.0, 3.0, 7.0])
    ids = np.array([10, 11, 14, 13, 12])
    assert composed_first_order(moved, u, ids).tolist() == [3, 1, 4, 2, 0]
    with pytest.raises(ValueError, match="unique"):
        composed_first_order(moved, u, np.array([1, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="one mask entry"):
        composed_first_order(moved[:4], u, ids)


def test_pooled_z_by_hand():
    assert pooled_z(0.5, 0.2, 0.3, 0.4) == pytest.approx(0.6)  # 0.3 / sqrt(0.09 + 0.16)
    assert pooled_z(0.5, 0.2, None, 0.4) is None
    assert pooled_z(0.5, 0.5, 0.0, 0.0) is None


def test_config_and_vectors_refuse_bad_input():
    with pytest.raises(ValueError, match="v2_fraction"):
        ChainConfig(v2_fraction=-0.1)
    with pytest.raises(ValueError, match="random_seeds"):
        ChainConfig(random_seeds=1)
    chain = synthetic_chain(np.random.default_rng(0), 10, 6)
    with pytest.raises(ValueError, match="u12"):
        ChainVectors(**(chain.__dict__ | {"u12": chain.u12[:-1]}))
    with pytest.raises(ValueError, match="v3"):
        ChainVectors(**(chain.__dict__ | {"queries": {"v1": chain.queries["v1"], "v2": chain.queries["v2"]}}))
    assert variant_name(0.5) == "v2_at_50" and variant_name(1.0) == "v2_at_100"


# ---- the whole chain vs a brute-force reference ----------------------------------------------------------------

A12 = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=np.float32)  # h12: v1 (3-d) -> v2 (3-d)
A23 = np.array([[1, 0, 0, 1], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=np.float32)  # h23: v2 (3-d) -> v3 (4-d)


def h12(x):
    return x @ A12


def h23(x):
    return x @ A23


def uncertainty(x):
    """A stand-in for FastFill's s: any function of the input row (here its squared norm, integer-valued)."""
    return (x.astype(np.float64) ** 2).sum(axis=1)


def synthetic_chain(rng, n_gallery, n_queries):
    """Small integer vectors (exact float32 scores under l2) and linear 'transformations'."""
    g_labels, q_labels = rng.integers(0, 3, n_gallery), rng.integers(0, 3, n_queries)

    def ints(n, dim):
        return rng.integers(-2, 3, size=(n, dim)).astype(np.float32)

    phi1, phi2, phi3 = ints(n_gallery, 3), ints(n_gallery, 3), ints(n_gallery, 4)
    return ChainVectors(
        query_labels=q_labels,
        gallery_labels=g_labels,
        gallery_ids=rng.permutation(1000)[:n_gallery] + 7,
        queries={"v1": ints(n_queries, 3), "v2": ints(n_queries, 3), "v3": ints(n_queries, 4)},
        phi1=phi1,
        phi2=phi2,
        phi3=phi3,
        h12=h12(phi1),
        h23_v2=h23(phi2),
        h23_h12=h23(h12(phi1)),
        u12=uncertainty(phi1),
        u23_v2=uncertainty(phi2),
        u23_h12=uncertainty(h12(phi1)),
    )


def by_priority(scores, ids):
    """Highest score first, equal scores by ascending id: written out, not via priority_order."""
    return np.array(sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i])))


def order_moved(chain, fraction):
    n = len(chain.gallery_ids)
    return by_priority(chain.u12, chain.gallery_ids)[: math.floor(round(fraction * n, 6))]


def run_of(variant, policy):
    return next(run for run in variant["runs"] if run["policy"] == policy)


def brute_force_curve(chain, fraction, betas, config, composed_first=False):
    """The chain walked item by item: stop v2, apply h23 to the v2 generation, order by h23's uncertainty on the
    item's generation vector, then at each beta assign phi3 item by item and evaluate the plain gallery."""
    n = len(chain.gallery_ids)
    v2_gen = chain.h12.copy()
    for i in order_moved(chain, fraction):
        v2_gen[i] = chain.phi2[i]
    start = h23(v2_gen)  # h23 on the generation itself, not on its two halves
    u = uncertainty(v2_gen)
    if composed_first:  # a score bonus larger than any uncertainty for the items still on h12(phi1)
        u = u + np.where(np.isin(np.arange(n), order_moved(chain, fraction)), 0.0, 1e9)
    v3_order = by_priority(u, chain.gallery_ids)
    top1, maps = [], []
    for beta in betas:
        gallery = start.copy()
        for i in v3_order[: math.floor(round(beta * n, 6))]:
            gallery[i] = chain.phi3[i]
        result = evaluate(chain.queries["v3"], gallery, chain.query_labels, chain.gallery_labels, config)
        top1.append(result.top1)
        maps.append(result.map)
    return np.array(top1), np.array(maps), start


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
def test_chain_curves_equal_the_brute_force_walk(fraction):
    chain = synthetic_chain(np.random.default_rng(5), 23, 11)
    config = ChainConfig(v2_fraction=fraction, beta_points=6, random_seeds=3, eval_config=EvalConfig(metric="l2"))
    section = evaluate_chain(chain, config)
    variant = section["variants"][0]
    assert variant["name"] == variant_name(fraction) and variant["v2_fraction"] == fraction
    ordered = run_of(variant, "uncertainty")
    betas = np.array(ordered["betas"])
    top1, maps, start = brute_force_curve(chain, fraction, betas, config.eval_config)
    assert ordered["top1"] == pytest.approx(top1, abs=1e-12)
    assert ordered["map"] == pytest.approx(maps, abs=1e-12)
    if fraction < 1:
        first = run_of(variant, COMPOSED_FIRST)
        top1, maps, _ = brute_force_curve(chain, fraction, betas, config.eval_config, composed_first=True)
        assert first["top1"] == pytest.approx(top1, abs=1e-12) and first["map"] == pytest.approx(maps, abs=1e-12)
    # beta 0 is v3 queries on h23 of the v2 generation; the end is v3/v3.
    at_start = evaluate(chain.queries["v3"], start, chain.query_labels, chain.gallery_labels, config.eval_config)
    assert ordered["top1"][0] == pytest.approx(at_start.top1)
    assert ordered["top1"][-1] == pytest.approx(section["anchors"]["v3_v3"]["top1"])
    assert ordered["map"][-1] == pytest.approx(section["anchors"]["v3_v3"]["map"])
    # The composed-path share at beta 0 is what v2 had not moved.
    assert variant["served"][SERVED_COMPOSED][0] == pytest.approx(1 - math.floor(round(fraction * 23, 6)) / 23)


def test_negative_flips_are_counted_against_the_v1_answer():
    chain = synthetic_chain(np.random.default_rng(9), 19, 13)
    eval_config = EvalConfig(metric="l2")
    section = evaluate_chain(chain, ChainConfig(beta_points=5, random_seeds=2, eval_config=eval_config))
    v1 = evaluate(chain.queries["v1"], chain.phi1, chain.query_labels, chain.gallery_labels, eval_config)
    v3 = evaluate(chain.queries["v3"], chain.phi3, chain.query_labels, chain.gallery_labels, eval_config)
    ordered = run_of(section["variants"][0], "uncertainty")
    assert ordered["nfr"][-1] == pytest.approx(float(np.mean(v1.correct_top1 & ~v3.correct_top1)))


def test_random_runs_carry_their_seeds_spread_and_the_curve_of_the_first_seed():
    chain = synthetic_chain(np.random.default_rng(3), 30, 12)
    config = ChainConfig(v2_fraction=0.5, beta_points=5, random_seeds=4, seed=2, eval_config=EvalConfig(metric="l2"))
    section = evaluate_chain(chain, config)
    random_run = run_of(section["variants"][0], "random")
    assert random_run["seed_aucs"]["seeds"] == [2, 3, 4, 5]
    assert random_run["seed_aucs"]["auc_map"][0] == pytest.approx(random_run["auc_map"])
    # Seed 3's curve, computed directly, gives the second area.
    from raybackfill.backfill.policies import priority_order, random_scores

    start = generation(moved_mask(priority_order(chain.u12, chain.gallery_ids), 0.5), chain.h23_v2, chain.h23_h12)
    v1 = evaluate(chain.queries["v1"], chain.phi1, chain.query_labels, chain.gallery_labels, config.eval_config)
    curve = backfill_curve(
        BackfillSpaces.compatible(chain.queries["v3"], start, chain.phi3),
        priority_order(random_scores(chain.gallery_ids, 3), chain.gallery_ids),
        chain.query_labels, chain.gallery_labels, v1.correct_top1, betas=np.linspace(0, 1, 5),
        config=config.eval_config,
    )  # fmt: skip
    assert random_run["seed_aucs"]["auc_map"][1] == pytest.approx(float(np.mean(curve.map)))
    versus = section["variants"][0]["versus_random"]
    assert [row["policy"] for row in versus] == ["uncertainty", COMPOSED_FIRST]
    for row in versus:
        z = row["auc_map_z"]
        expected = "noise" if z is None or abs(z) < 2 else ("holds" if z > 0 else "reversed")
        assert row["auc_map_verdict"] == (expected if z is not None else "missing")


def test_stopped_and_finished_variants_and_their_comparison():
    chain = synthetic_chain(np.random.default_rng(4), 25, 10)
    section = evaluate_chain(chain, ChainConfig(v2_fraction=0.4, beta_points=5, random_seeds=3))
    assert [v["name"] for v in section["variants"]] == ["v2_at_40", "v2_at_100"]
    finished = section["variants"][1]
    assert finished["served"][SERVED_COMPOSED] == [0.0] * 5  # v2 moved everything before v3 started
    # composed-first is the uncertainty order when nothing is left on the composed path
    assert [run["policy"] for run in finished["runs"]] == ["uncertainty", "random"]
    assert [run["policy"] for run in section["variants"][0]["runs"]] == ["uncertainty", COMPOSED_FIRST, "random"]
    assert set(section["anchors"]) == set(CHAIN_ANCHORS)
    comparison = section["comparison"]
    assert (comparison["a"], comparison["b"]) == ("v2_at_100", "v2_at_40")
    spread = [np.array(run_of(v, "random")["seed_aucs"]["auc_map"]) for v in section["variants"]]
    z = (spread[1].mean() - spread[0].mean()) / math.sqrt(spread[1].var(ddof=1) + spread[0].var(ddof=1))
    assert comparison["auc_map"]["z"] == pytest.approx(z)
    # A finished v2 as the configuration gives one variant and no comparison.
    only = evaluate_chain(chain, ChainConfig(v2_fraction=1.0, beta_points=5, random_seeds=2))
    assert len(only["variants"]) == 1 and "comparison" not in only


# ---- end to end: section -> report.json, report.md, PNG, summary ---------------------------------------------


def test_chain_section_lands_in_the_report_files_and_the_summary(tmp_path):
    chain = synthetic_chain(np.random.default_rng(11), 40, 15)
    eval_config = EvalConfig(metric="cosine")
    q, g = chain.queries, chain
    old_old = evaluate(q["v1"], g.phi1, g.query_labels, g.gallery_labels, eval_config)
    new_new = evaluate(q["v2"], g.phi2, g.query_labels, g.gallery_labels, eval_config)
    curve = backfill_curve(
        BackfillSpaces.compatible(q["v2"], g.h12, g.phi2), np.arange(40), g.query_labels, g.gallery_labels,
        old_old.correct_top1, betas=np.linspace(0, 1, 5), config=eval_config,
    )  # fmt: skip
    report = build_report({"old_old": old_old, "new_new": new_new}, [Run("fct", "random", "compatible", curve)])
    before = json.loads(json.dumps(report))
    report["chain"] = evaluate_chain(chain, ChainConfig(beta_points=5, random_seeds=3, eval_config=eval_config))
    paths = write_outputs(report, str(tmp_path))
    assert CHAIN_PLOT_FILE in output_files(report) and CHAIN_PLOT_FILE not in output_files(before)
    png = (tmp_path / CHAIN_PLOT_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    saved = json.loads((tmp_path / REPORT_FILE).read_text())
    assert {k: v for k, v in saved.items() if k != "chain"} == before  # every other key as it was
    assert saved["chain"]["variants"][0]["name"] == "v2_at_50"
    markdown = (tmp_path / MARKDOWN_FILE).read_text()
    assert "chained upgrade v1 -> v2 -> v3" in markdown and "v3_h23_h12_v1" in markdown
    text = summary(saved, list(paths))
    assert "chained upgrade v1 -> v2 -> v3, v3 started with v2's backfill at 50%" in text
    assert "v2_at_50" in text and "v2_at_100" in text
    verdict = saved["chain"]["comparison"]["auc_map"]["verdict"]
    assert (verdict == "noise") == ("noise: inside the random orders' spread" in text)
