"""A chain of upgrades v1 -> v2 -> v3 evaluated offline, where the v3 upgrade starts before v2's backfill ended.

The state of the chain (every function below the evaluation glue is pure numpy):

1. v2's backfill re-embedded the first ``floor(f * N)`` items of its order (FastFill uncertainty of h12)
   and stopped: :func:`moved_mask`. The v2 generation of the gallery is ``phi2(x)`` for those items and
   ``h12(phi1(x))`` for the rest: :func:`generation`.
2. The v3 upgrade starts from that generation: every item gets h23 of its v2-generation vector (beta = 0),
   so items v2 never re-embedded are served through the composed transformations ``h23(h12(phi1(x)))``.
   Since h23 acts row by row, ``h23(generation)`` is :func:`generation` of ``h23(phi2)`` and
   ``h23(h12(phi1))`` with the same mask, which is how the caller passes it.
3. v3's backfill then re-embeds straight to ``phi3(x)`` in its own order (FastFill uncertainty of h23 on the
   item's v2-generation vector; the items v2 never reached first, :func:`composed_first_order`; or random),
   skipping v2 for the items not yet moved: at fraction beta the gallery is :func:`gallery_at`.
   :func:`provenance_shares` says what serves each item along the way.

The curves are scored with v3 queries (strategy ``compatible``), negative flips against the v1/v1 answer,
AUC as the mean over an even beta grid. A "finished" variant (v2 at 100 % before v3 starts) is evaluated next
to the stopped one, and each priority order against several random orders: a gap inside their spread is
reported as noise (:func:`raybackfill.eval.findings.verdict`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from raybackfill.backfill.policies import priority_order, random_scores
from raybackfill.eval.curves import BackfillCurve, BackfillSpaces, auc_mean, backfill_curve, even_betas, n_backfilled
from raybackfill.eval.findings import Verdict, verdict
from raybackfill.eval.metrics import EvalConfig, RetrievalResult, evaluate
from raybackfill.eval.report import ANCHOR_KEYS, Run, render_table, run_entry, versus_random
from raybackfill.types import Policy, Strategy

# The chain's anchors: name -> (query model, what the gallery holds), in report order.
CHAIN_ANCHORS = {
    "v1_v1": ("v1", "phi1"),
    "v2_v2": ("v2", "phi2"),
    "v3_v3": ("v3", "phi3"),
    "v3_h23_v2": ("v3", "h23(phi2)"),
    "v3_h23_h12_v1": ("v3", "h23(h12(phi1))"),
}
# What serves an item during the v3 backfill (provenance_shares' keys).
SERVED_V3, SERVED_VIA_V2, SERVED_COMPOSED = "phi3", "h23(phi2)", "h23(h12(phi1))"
# v3's backfill order that re-embeds the items v2 never reached (served through both transformations) first,
# each group by h23's uncertainty: what a team would try when the composed path serves worst.
COMPOSED_FIRST = "composed_first"


# ---- the chain's state: pure functions ---------------------------------------------------------------------


def moved_mask(order: np.ndarray, fraction: float) -> np.ndarray:
    """Which items a backfill in ``order`` (gallery positions, first = first re-embedded) had re-embedded
    when it stopped at ``fraction`` of the gallery: the first ``floor(fraction * N)`` of the order.

    Args:
        order: a permutation of the gallery positions 0..N-1.
        fraction: the share of the gallery re-embedded, in [0, 1].

    Returns:
        A boolean array of N entries, True for the moved items.

    Example:
        >>> moved_mask(np.array([2, 0, 1, 3]), 0.5).tolist()
        [True, False, True, False]
    """
    order = np.asarray(order)
    n = len(order)
    if order.ndim != 1 or not np.array_equal(np.sort(order), np.arange(n)):
        raise ValueError(f"order must be a permutation of the {n} gallery positions")
    mask = np.zeros(n, dtype=bool)
    mask[order[: n_backfilled(fraction, n)]] = True
    return mask


def generation(moved: np.ndarray, moved_vectors: np.ndarray, kept_vectors: np.ndarray) -> np.ndarray:
    """A gallery generation: row i is ``moved_vectors[i]`` where ``moved[i]``, else ``kept_vectors[i]``.

    With ``phi2`` and ``h12(phi1)`` this is the v2 generation of a stopped backfill; with ``h23(phi2)`` and
    ``h23(h12(phi1))`` it is h23 of that generation (h23 maps each row on its own).

    Example:
        >>> generation(np.array([True, False]), np.array([[1.0], [2.0]]), np.array([[9.0], [8.0]])).tolist()
        [[1.0], [8.0]]
    """
    moved = np.asarray(moved, dtype=bool)
    moved_vectors, kept_vectors = np.asarray(moved_vectors), np.asarray(kept_vectors)
    if moved_vectors.shape != kept_vectors.shape or moved_vectors.ndim != 2 or moved.shape != (len(moved_vectors),):
        raise ValueError(
            f"need one mask entry per row of two equally shaped 2-D arrays, got mask {moved.shape}, "
            f"moved vectors {moved_vectors.shape} and kept vectors {kept_vectors.shape}"
        )
    return np.where(moved[:, None], moved_vectors, kept_vectors)


def gallery_at(start: np.ndarray, final: np.ndarray, order: np.ndarray, beta: float) -> np.ndarray:
    """The v3 gallery at backfill fraction ``beta``: ``final`` (phi3) for the first ``floor(beta * N)`` items
    of ``order``, ``start`` (h23 of the v2 generation) for the others. What :func:`chain_curve` scores at each
    beta, written out item by item.

    Example:
        >>> gallery_at(np.zeros((3, 1)), np.ones((3, 1)), np.array([1, 2, 0]), 0.34).ravel().tolist()
        [0.0, 1.0, 0.0]
    """
    return generation(moved_mask(order, beta), final, start)


def provenance_shares(v2_moved: np.ndarray, v3_order: np.ndarray, betas: np.ndarray) -> dict[str, list[float]]:
    """At each v3 backfill fraction, the share of the gallery served as phi3 (re-embedded by v3), as h23(phi2)
    (re-embedded by v2, not yet by v3) and as h23(h12(phi1)) (never re-embedded: the composed transformations).

    Example:
        >>> provenance_shares(np.array([True, False]), np.array([1, 0]), np.array([0.0, 0.5, 1.0]))["h23(h12(phi1))"]
        [0.5, 0.0, 0.0]
    """
    v2_moved = np.asarray(v2_moved, dtype=bool)
    shares: dict[str, list[float]] = {SERVED_V3: [], SERVED_VIA_V2: [], SERVED_COMPOSED: []}
    n = len(v2_moved)
    for beta in np.asarray(betas, dtype=np.float64):
        v3 = moved_mask(v3_order, float(beta))
        shares[SERVED_V3].append(float(v3.sum()) / n)
        shares[SERVED_VIA_V2].append(float((~v3 & v2_moved).sum()) / n)
        shares[SERVED_COMPOSED].append(float((~v3 & ~v2_moved).sum()) / n)
    return shares


def composed_first_order(v2_moved: np.ndarray, uncertainty: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """v3's backfill order with the items v2 had not re-embedded first: within each group the higher
    ``uncertainty`` first, equal ones by ascending id.

    Example:
        >>> composed_first_order(np.array([True, False, False]), np.array([9.0, 1.0, 2.0]), np.array([5, 6, 7]))
        array([2, 1, 0])
    """
    v2_moved = np.asarray(v2_moved, dtype=bool)
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    ids = np.asarray(ids, dtype=np.int64)
    if not v2_moved.shape == uncertainty.shape == ids.shape or ids.ndim != 1:
        raise ValueError(f"need one mask entry, uncertainty and id per item, got {v2_moved.shape}, "
                         f"{uncertainty.shape} and {ids.shape}")  # fmt: skip
    if len(np.unique(ids)) != len(ids):
        raise ValueError("ids must be unique for a deterministic order")
    return np.lexsort((ids, -uncertainty, v2_moved))


def pooled_z(a: float, b: float, sd_a: float | None, sd_b: float | None) -> float | None:
    """(a - b) in the pooled standard deviation sqrt(sd_a^2 + sd_b^2); None without both spreads or with no
    spread at all (equal values then give no evidence either way).

    Example:
        >>> pooled_z(0.5, 0.2, 0.3, 0.4)
        0.6
    """
    if sd_a is None or sd_b is None:
        return None
    sd = math.sqrt(sd_a**2 + sd_b**2)
    return round((a - b) / sd, 12) if sd > 0 else None


# ---- the evaluation glue: vectors in, report section out ---------------------------------------------------


@dataclass(frozen=True)
class ChainVectors:
    """Every vector the chain scores with; rows aligned with ``gallery_ids`` / the query labels.

    ``queries``: ``v1``, ``v2``, ``v3`` query embeddings. Gallery: ``phi1``, ``phi2``, ``phi3`` (each model's
    embedding), ``h12`` (= h12(phi1)), ``h23_v2`` (= h23(phi2)), ``h23_h12`` (= h23(h12(phi1))).
    Uncertainties (FastFill's s, higher = re-embed sooner): ``u12`` of h12 on phi1 (v2's order), ``u23_v2``
    and ``u23_h12`` of h23 on phi2 and on h12(phi1) (v3's order reads the one of the item's generation).
    """

    query_labels: np.ndarray
    gallery_labels: np.ndarray
    gallery_ids: np.ndarray
    queries: Mapping[str, np.ndarray]
    phi1: np.ndarray
    phi2: np.ndarray
    phi3: np.ndarray
    h12: np.ndarray
    h23_v2: np.ndarray
    h23_h12: np.ndarray
    u12: np.ndarray
    u23_v2: np.ndarray
    u23_h12: np.ndarray

    def __post_init__(self) -> None:
        missing = [name for name in ("v1", "v2", "v3") if name not in self.queries]
        if missing:
            raise ValueError(f"chain queries lack {missing}")
        n = len(self.gallery_ids)
        for name in ("gallery_labels", "phi1", "phi2", "phi3", "h12", "h23_v2", "h23_h12", "u12", "u23_v2", "u23_h12"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"chain {name} has {len(getattr(self, name))} rows for {n} gallery ids")
        for name, q in self.queries.items():
            if len(q) != len(self.query_labels):
                raise ValueError(f"chain {name} queries have {len(q)} rows for {len(self.query_labels)} labels")


@dataclass(frozen=True)
class ChainConfig:
    """How the chain is evaluated: where v2's backfill stopped (``v2_fraction`` of the gallery, in v2's
    uncertainty order), the beta grid, how many random orders (seeds ``seed``, ``seed + 1``, ...) and the
    metric / protocol (``eval_config``)."""

    v2_fraction: float = 0.5
    beta_points: int = 21
    random_seeds: int = 8
    seed: int = 0
    eval_config: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.v2_fraction <= 1.0:
            raise ValueError(f"v2_fraction must lie in [0, 1], got {self.v2_fraction}")
        if self.random_seeds < 2:
            raise ValueError(f"random_seeds must be at least 2 (a spread needs two orders), got {self.random_seeds}")
        even_betas(self.beta_points)


def variant_name(fraction: float) -> str:
    """``v2_at_50`` for a v3 upgrade started with v2's backfill at 50 %."""
    return f"v2_at_{round(100 * fraction):d}"


def chain_curve(
    vectors: ChainVectors, start: np.ndarray, order: np.ndarray, v1_v1: RetrievalResult, config: ChainConfig
) -> BackfillCurve:
    """The v3 backfill's curve from ``start`` (h23 of the v2 generation) to phi3, with v3 queries."""
    spaces = BackfillSpaces.compatible(vectors.queries["v3"], start, vectors.phi3)
    return backfill_curve(
        spaces,
        order,
        vectors.query_labels,
        vectors.gallery_labels,
        v1_v1.correct_top1,
        betas=even_betas(config.beta_points),
        config=config.eval_config,
    )


def evaluate_chain(vectors: ChainVectors, config: ChainConfig = ChainConfig()) -> dict:
    """The report's ``chain`` section: anchors, and per variant (v2 stopped at ``config.v2_fraction``, v2
    finished) the v3 backfill's curves under the uncertainty order, the composed-first order (stopped v2 only)
    and several random orders, the shares of the
    gallery each path serves, the uncertainty order against the random spread, and the stopped variant against
    the finished one.

    Args:
        vectors: the chain's embeddings, transformations' outputs and uncertainties (see :class:`ChainVectors`).
        config: v2's stop fraction, beta grid, random orders, metric.

    Returns:
        A JSON-ready dict: ``v2_fraction``, ``anchors`` (``CHAIN_ANCHORS``), ``variants`` (one per v2 state:
        ``name``, ``v2_fraction``, ``runs`` in the report's run schema, ``served``, ``versus_random``) and
        ``comparison`` (stopped vs finished, with its verdict).

    Example:
        >>> section = evaluate_chain(vectors, ChainConfig(v2_fraction=0.5))  # doctest: +SKIP
        >>> [v["name"] for v in section["variants"]]  # doctest: +SKIP
        ['v2_at_50', 'v2_at_100']
    """
    ids, q = np.asarray(vectors.gallery_ids), vectors.queries

    def measure(queries: np.ndarray, gallery: np.ndarray) -> RetrievalResult:
        return evaluate(queries, gallery, vectors.query_labels, vectors.gallery_labels, config.eval_config)

    anchors = {
        "v1_v1": measure(q["v1"], vectors.phi1),
        "v2_v2": measure(q["v2"], vectors.phi2),
        "v3_v3": measure(q["v3"], vectors.phi3),
        "v3_h23_v2": measure(q["v3"], vectors.h23_v2),
        "v3_h23_h12_v1": measure(q["v3"], vectors.h23_h12),
    }
    v1_v1, v3_v3 = anchors["v1_v1"], anchors["v3_v3"]
    v2_order = priority_order(np.asarray(vectors.u12, dtype=np.float64).reshape(-1), ids)
    betas = even_betas(config.beta_points)
    fractions = list(dict.fromkeys((config.v2_fraction, 1.0)))
    variants = []
    for fraction in fractions:
        moved = moved_mask(v2_order, fraction)
        start = generation(moved, vectors.h23_v2, vectors.h23_h12)
        uncertainty = generation(moved, np.reshape(vectors.u23_v2, (-1, 1)), np.reshape(vectors.u23_h12, (-1, 1)))
        name = variant_name(fraction)
        ordered = priority_order(uncertainty[:, 0].astype(np.float64), ids)
        runs = [Run(name, Policy.UNCERTAINTY, Strategy.COMPATIBLE, chain_curve(vectors, start, ordered, v1_v1, config))]
        if not moved.all():  # with every item moved by v2 it is the uncertainty order
            first = composed_first_order(moved, uncertainty[:, 0], ids)
            runs.append(
                Run(name, COMPOSED_FIRST, Strategy.COMPATIBLE, chain_curve(vectors, start, first, v1_v1, config))
            )
        seed_aucs, random_curve = {}, None
        for seed in range(config.seed, config.seed + config.random_seeds):
            curve = chain_curve(vectors, start, priority_order(random_scores(ids, seed), ids), v1_v1, config)
            random_curve = curve if random_curve is None else random_curve
            seed_aucs[seed] = (auc_mean(curve.betas, curve.top1), auc_mean(curve.betas, curve.map))
        assert random_curve is not None  # random_seeds >= 2
        runs.append(Run(name, Policy.RANDOM, Strategy.COMPATIBLE, random_curve, seed_aucs))
        entries = [run_entry(run, v1_v1, v3_v3) for run in runs]
        variants.append(
            {
                "name": name,
                "v2_fraction": fraction,
                "runs": entries,
                # What serves the gallery along the uncertainty order's backfill.
                "served": provenance_shares(moved, ordered, betas),
                "versus_random": [_with_verdicts(row) for row in versus_random({"runs": entries})],
            }
        )
    section: dict = {
        "v2_fraction": config.v2_fraction,
        "random_seeds": config.random_seeds,
        "query": "v3",
        "strategy": Strategy.COMPATIBLE.value,
        "anchors": {name: {k: _number(getattr(r, k)) for k in ANCHOR_KEYS} for name, r in anchors.items()},
        "variants": variants,
    }
    if len(variants) == 2:
        section["comparison"] = compare_variants(stopped=variants[0], finished=variants[1])
    validate_chain(section)
    return section


def _number(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _with_verdicts(row: Mapping) -> dict:
    return dict(row) | {f"{key}_verdict": verdict(row[f"{key}_z"]).value for key in ("auc_top1", "auc_map")}


def _random_run(variant: Mapping) -> Mapping:
    return next(run for run in variant["runs"] if run["policy"] == Policy.RANDOM)


def _spread(values: Sequence[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


FINISHED_CLAIM = "a v3 backfill from a finished v2 has the larger area"


def compare_variants(stopped: Mapping, finished: Mapping) -> dict:
    """The v3 backfill from a finished v2 (``a``) against the one from a stopped v2 (``b``): the gap of their
    random orders' mean AUCs in the pooled spread of those orders (z, positive: the finished start is better),
    and its verdict on :data:`FINISHED_CLAIM` (``noise`` inside the spread)."""
    out: dict = {"claim": FINISHED_CLAIM, "a": finished["name"], "b": stopped["name"]}
    for key in ("auc_top1", "auc_map"):
        (ma, sa), (mb, sb) = (_spread(_random_run(v)["seed_aucs"][key]) for v in (finished, stopped))
        z = pooled_z(ma, mb, sa, sb)
        out[key] = {"a": ma, "b": mb, "z": z, "verdict": verdict(z).value}
    return out


def validate_chain(section: Mapping) -> None:
    """Raise ValueError naming the first thing a reader of the chain section would miss."""
    for key in ("v2_fraction", "anchors", "variants"):
        if key not in section:
            raise ValueError(f"report: chain lacks '{key}'")
    for name in CHAIN_ANCHORS:
        if name not in section["anchors"]:
            raise ValueError(f"report: chain anchors lack '{name}'")
    for variant in section["variants"]:
        for key in ("name", "v2_fraction", "runs", "served", "versus_random"):
            if key not in variant:
                raise ValueError(f"report: chain variant lacks '{key}'")


def chain_rows(section: Mapping) -> list[list]:
    """One row per variant x order: AUCs, top-1 at beta 0 and the end, max NFR, and for the priority order
    its z against the random orders with the verdict."""
    rows = []
    for variant in section["variants"]:
        versus = {row["policy"]: row for row in variant["versus_random"]}
        for run in variant["runs"]:
            row = versus.get(run["policy"])
            judged = "-"
            if row is not None and row["auc_map_z"] is not None:
                judged = f"{row['auc_map_z']:+.1f} {row['auc_map_verdict']}"
            spread = _spread(run["seed_aucs"]["auc_map"])[1] if "seed_aucs" in run else None
            auc_map = f"{run['auc_map']:.3f}" + ("" if spread is None else f" ± {spread:.3f}")
            rows.append(
                [variant["name"], run["policy"], run["top1"][0], run["auc_top1"], auc_map, run["final_top1"],
                 run["max_nfr"], judged]
            )  # fmt: skip
    return rows


CHAIN_HEADER = ["v2 state", "v3 order", "top-1 at beta 0", "AUC top-1", "AUC mAP", "final top-1", "max NFR",
                "z mAP vs random"]  # fmt: skip


def chain_table(section: Mapping, markdown: bool = False) -> str:
    """The chain section as text: anchors, the curves' table and the stopped-vs-finished comparison."""
    anchors = render_table(
        ["anchor", "query", "gallery", "top-1", "mAP"],
        [[name, *CHAIN_ANCHORS[name], values["top1"], values["map"]] for name, values in section["anchors"].items()],
        markdown,
    )
    text = (
        f"chained upgrade v1 -> v2 -> v3: v2's backfill stopped at {section['v2_fraction']:.0%} (its uncertainty "
        f"order), v3's backfill from h23 of that generation; v3 queries; AUC mAP of random orders: mean of "
        f"{section['random_seeds']} ± sd\n\n{anchors}\n\n{render_table(CHAIN_HEADER, chain_rows(section), markdown)}"
    )
    comparison = section.get("comparison")
    if comparison:
        text += "\n\n" + comparison_line(comparison)
    return text


def comparison_line(comparison: Mapping) -> str:
    """One sentence: the finished variant's random-order AUC mAP against the stopped one's, with the verdict."""
    m = comparison["auc_map"]
    z = "-" if m["z"] is None else f"{m['z']:+.1f}"
    word = "noise: inside the random orders' spread" if m["verdict"] == Verdict.NOISE else m["verdict"]
    return (
        f"{comparison['claim']}: {comparison['a']} {m['a']:.3f} vs {comparison['b']} {m['b']:.3f} "
        f"(random orders' mean AUC mAP), z {z} ({word})"
    )
