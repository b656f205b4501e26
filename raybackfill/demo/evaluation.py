"""The demo's evaluation stage: anchors (old/old, new/new and every cross test) and one backfill curve per
method x order, on the gallery and query splits, which no training stage has seen.

Which vectors each method scores with, and each order, come from raybackfill.eval.offline; the research
diagnostics (``DemoConfig.diagnostics``) from raybackfill.eval.diagnostics.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raybackfill.backfill.policies import priority_scores
from raybackfill.compat.recipes import get_recipe
from raybackfill.data.schema import EMBEDDING, ID, LABEL, SIDE_INFO, embedding_table, vectors_of
from raybackfill.demo.adapters import ADAPTER_PREFIX
from raybackfill.demo.configs import DemoConfig, DemoScale
from raybackfill.demo.pipeline import DemoArtifacts, rows_of_ids
from raybackfill.demo.training import TRANSFORMATIONS
from raybackfill.eval import diagnostics
from raybackfill.eval.metrics import EvalConfig, RetrievalResult, evaluate
from raybackfill.eval.offline import Embeddings, LoadedTables, OfflineConfig, Order, method_spaces, order_run
from raybackfill.eval.report import adapter_section, build_report
from raybackfill.models.artifacts import load_model, read_spec
from raybackfill.models.transformations import apply_transformation
from raybackfill.types import BackboneLoss, Method, Policy, Protocol

UNCERTAINTY, ENTROPY, RANDOM = Order(Policy.UNCERTAINTY), Order(Policy.ENTROPY), Order(Policy.RANDOM)
# Backfill orders evaluated per method (first listed = the one the method is usually quoted with).
METHOD_ORDERS: dict[Method, tuple[Order, ...]] = {
    Method.BCT: (ENTROPY, RANDOM),
    Method.RACT: (ENTROPY, RANDOM),
    Method.FCT: (RANDOM,),
    Method.FCT_SIDE_INFO: (RANDOM,),
    Method.FASTFILL: (UNCERTAINTY, RANDOM, ENTROPY),
    Method.FASTFILL_SIDE_INFO: (UNCERTAINTY, RANDOM, ENTROPY),
    Method.RANK_MERGE: (RANDOM, ENTROPY),
    Method.RANK_MERGE_PSI: (RANDOM, ENTROPY),
}
# Table columns of each backbone's vectors in the all-images embedding table.
COLUMNS = {"old": EMBEDDING, "new": "new", "bct": "bct", "ract": "ract"}


def method_orders(method: Method, with_diagnostics: bool = False) -> tuple[Order, ...]:
    """The orders evaluated for ``method``; with diagnostics, uncertainty methods add the oracle order."""
    orders = METHOD_ORDERS[method]
    if with_diagnostics and get_recipe(method).uncertainty:
        orders += (diagnostics.ORACLE_ORDER,)
    return orders


def evaluate_demo(
    artifacts: DemoArtifacts, table: pa.Table, labels: dict[str, pa.Table], scale: DemoScale, config: DemoConfig
) -> dict:
    """The report (eval.report schema, plus ``diagnostics`` when ``config.diagnostics`` and ``adapters`` when the
    artefacts hold label-free adapters: each one's new-query figures on the mapped old gallery beside FCT's).

    ``table`` holds every image under every backbone (see ``pipeline.embed_all``); ``labels`` the id and
    label of each split. The FCT/FastFill gallery and psi(new query) are computed here from the stored
    vectors with the trained transformations.
    """
    eval_config = EvalConfig(metric=config.metric, protocol=Protocol.DISJOINT)
    q_ids, q_labels = (labels["query"].column(c).to_numpy() for c in (ID, LABEL))
    g_ids, g_labels = (labels["gallery"].column(c).to_numpy() for c in (ID, LABEL))
    q_table, g_table = table.take(rows_of_ids(table, q_ids)), table.take(rows_of_ids(table, g_ids))
    query = {name: vectors_of(q_table, column) for name, column in COLUMNS.items()}
    gallery = {name: vectors_of(g_table, column) for name, column in COLUMNS.items()}
    side = vectors_of(g_table, SIDE_INFO)
    heads = {m: load_model(artifacts.models[m]).module for m in TRANSFORMATIONS}
    transformed = {
        m: apply_transformation(h, gallery["old"], side if h.uses_side_info else None)[0] for m, h in heads.items()
    }
    query["psi"] = apply_transformation(load_model(artifacts.models["psi"]).module, query["new"])[0]

    def measure(q: np.ndarray, g: np.ndarray) -> RetrievalResult:
        return evaluate(q, g, q_labels, g_labels, eval_config)

    anchors = {
        "old_old": measure(query["old"], gallery["old"]),
        "new_new": measure(query["new"], gallery["new"]),
        "bct_old": measure(query["bct"], gallery["old"]),
        "bct_bct": measure(query["bct"], gallery["bct"]),
        "ract_old": measure(query["ract"], gallery["old"]),
        "ract_ract": measure(query["ract"], gallery["ract"]),
        "psi_old": measure(query["psi"], gallery["old"]),
        **{f"new_{m}": measure(query["new"], transformed[m]) for m in TRANSFORMATIONS},
    }

    def embeddings(ids: np.ndarray, vectors: np.ndarray, side_info: np.ndarray | None = None) -> Embeddings:
        return Embeddings(ids, vectors, embedding_table(ids, vectors, side_info=side_info))

    old_gallery = embeddings(g_ids, gallery["old"], side)
    new_classifier = load_model(artifacts.models["new"]).classifier if config.diagnostics else None
    runs = []
    diagnosed: dict[str, float] = {}
    for method in METHOD_ORDERS:
        recipe = get_recipe(method)
        backbone = recipe.backbone_loss if recipe.backbone_loss in (BackboneLoss.BCT, BackboneLoss.RACT) else "new"
        old_of_method = old_gallery
        if recipe.uncertainty and config.diagnostics:
            assert new_classifier is not None  # loaded with config.diagnostics
            old_of_method = diagnostics.with_oracle_loss(
                old_gallery, transformed[method], gallery["new"], g_labels, new_classifier
            )
            scores = priority_scores(
                Policy.UNCERTAINTY,
                g_ids,
                old=gallery["old"],
                side=side if heads[method].uses_side_info else None,
                transformation=heads[method],
            )
            diagnosed |= diagnostics.uncertainty_diagnostics(method, scores, transformed[method], gallery["new"])
        tables = LoadedTables(
            q_labels,
            g_labels,
            queries={name: embeddings(q_ids, query[name]) for name in ("old", "psi")}
            | {"new": embeddings(q_ids, query[backbone])},
            gallery={"old": old_of_method, "new": embeddings(g_ids, gallery[backbone])}
            | ({"transformed": embeddings(g_ids, transformed[method])} if recipe.forward_transformation else {}),
        )
        orders = method_orders(method, config.diagnostics)
        offline = OfflineConfig(
            method,
            orders=orders,
            beta_points=scale.beta_points,
            metric=config.metric,
            seed=config.seed,
            transformation=artifacts.models[method] if recipe.uncertainty else None,
            old_model=artifacts.models["old"],
            # Priority orders are judged against a band of random orders, not one draw (fct alone has none).
            random_seeds=scale.random_seeds if len(orders) > 1 else 1,
        )
        spaces = method_spaces(method, tables)
        runs += [order_run(order, spaces, tables, offline, anchors["old_old"], eval_config) for order in orders]
    report = build_report(anchors, runs)
    adapters = {name: uri for name, uri in artifacts.models.items() if name.startswith(ADAPTER_PREFIX)}
    if adapters:
        fitted = {}
        for name, uri in adapters.items():
            mapped = apply_transformation(load_model(uri).module, gallery["old"])[0]
            record = read_spec(uri).adapter
            fitted[name] = (measure(query["new"], mapped), {"score": record["score"], "fit": record["fit"]})
        references = {m.value: anchors[f"new_{m}"] for m in TRANSFORMATIONS}
        report["adapters"] = adapter_section(anchors["old_old"], anchors["new_new"], fitted, references)
    if config.diagnostics:
        report["diagnostics"] = diagnosed
    return report
