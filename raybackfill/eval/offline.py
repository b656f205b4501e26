"""Offline evaluation of one upgrade method on embedding tables: anchors, backfill curves per order, report files.

The glue between stored tables and the evaluation math (metrics, curves, report, plots): tables are
matched by id (every table of a set must hold the set's ids; rows are reordered to the old table's), the
method's recipe says which vectors score the not-yet-backfilled and the backfilled items, and each
backfill order (:class:`Order`) is a priority policy (raybackfill.backfill.policies) or a stored score column.
Labels come from the old query and old gallery tables (``label`` column); protocol "disjoint"; metric cosine
or l2 (see raybackfill.eval.metrics).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from raybackfill.backfill.policies import priority_order, priority_scores
from raybackfill.compat.recipes import get_recipe
from raybackfill.data.schema import ID, LABEL, SIDE_INFO, validate_embedding_table, vectors_of
from raybackfill.data.storage import join, read_table, write_bytes
from raybackfill.eval.chain import chain_table
from raybackfill.eval.curves import (
    DEFAULT_POINTS,
    BackfillCurve,
    BackfillSpaces,
    auc_mean,
    backfill_curve,
    even_betas,
)
from raybackfill.eval.metrics import EvalConfig, RetrievalResult, cross_tests
from raybackfill.eval.plots import plot_chain, plot_curves, plot_online
from raybackfill.eval.report import Run, build_report, save_report, summary_table
from raybackfill.models.artifacts import load_model
from raybackfill.types import Method, Metric, OldQuerySource, Policy, Protocol, Strategy, locate_ids, parse

COLUMN_PREFIX = "column:"
REPORT_FILE = "report.json"
PLOT_FILE = "backfill_curves.png"
ONLINE_PLOT_FILE = "online_quality.png"
CHAIN_PLOT_FILE = "chain_curves.png"
MARKDOWN_FILE = "report.md"


def rows_of(ids: np.ndarray, wanted: np.ndarray, source: str) -> np.ndarray:
    """Row positions of the ``wanted`` ids among unique ``ids``; a ValueError naming ``source`` if any is missing."""
    try:
        return locate_ids(np.asarray(ids, dtype=np.int64), np.asarray(wanted, dtype=np.int64))
    except KeyError as err:
        raise ValueError(f"{source}: {err.args[0]}") from None


@dataclass(frozen=True)
class Order:
    """A backfill order: a priority ``policy``, or a numeric score ``column`` of the old (then the
    transformed) gallery table, highest first. Exactly one of the two is set.

    The command line and report.json write an order as the policy's name or ``column:NAME``
    (:meth:`parse` reads that form back, ``str`` writes it).
    """

    policy: Policy | None = None
    column: str | None = None

    def __post_init__(self) -> None:
        if (self.policy is None) == (self.column is None):
            raise ValueError(f"an order is a policy or a score column, not both or neither: {self!r}")
        if self.policy is not None:
            object.__setattr__(self, "policy", parse(Policy, self.policy, what="order"))
        elif not self.column:
            raise ValueError("an order's score column needs a name")

    @classmethod
    def parse(cls, text: str | Order) -> Order:
        """``"random"`` -> ``Order(Policy.RANDOM)``; ``"column:NAME"`` -> ``Order(column="NAME")``."""
        if isinstance(text, Order):
            return text
        if text.startswith(COLUMN_PREFIX):
            return cls(column=text[len(COLUMN_PREFIX) :])
        if text in set(Policy):
            return cls(policy=Policy(text))
        raise ValueError(f"unknown order {text!r}; use one of {', '.join(Policy)} or {COLUMN_PREFIX}NAME")

    def __str__(self) -> str:
        return str(self.policy) if self.policy is not None else f"{COLUMN_PREFIX}{self.column}"


@dataclass(frozen=True)
class EvalInputs:
    """Embedding table URIs: queries and gallery in the old and new model's space, and optional extras.

    ``gallery_transformed``: the old gallery sent through the forward transformation (FCT / FastFill);
    ``psi_queries``: psi(new query embeddings), the old-space query of rank_merge_psi.
    """

    queries_old: str
    queries_new: str
    gallery_old: str
    gallery_new: str
    gallery_transformed: str | None = None
    psi_queries: str | None = None


@dataclass(frozen=True)
class OfflineConfig:
    """What to evaluate: the method (a recipe name), backfill orders, beta grid and metric.

    ``orders``: :class:`Order` values (their string forms are parsed). ``transformation``: FastFill
    artefact for the ``uncertainty`` policy; ``old_model``: old backbone artefact whose classifier gives
    ``entropy`` / ``least_confidence``. ``random_seeds``: how many random orders (seeds ``seed``,
    ``seed + 1``, ...) the random run is measured over; the report then gives their AUC band, which other
    orders are judged against (see eval.report.versus_random). Its curve stays the one of ``seed``.
    """

    method: Method
    orders: tuple[Order, ...] = (Order(Policy.RANDOM),)
    beta_points: int = DEFAULT_POINTS
    metric: Metric = Metric.COSINE
    seed: int = 0
    memory_budget_mb: int = 2048
    transformation: str | None = None
    old_model: str | None = None
    random_seeds: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", parse(Method, self.method, what="method"))
        object.__setattr__(self, "metric", parse(Metric, self.metric, what="metric"))
        object.__setattr__(self, "orders", tuple(Order.parse(order) for order in self.orders))
        if self.random_seeds < 1:
            raise ValueError(f"random_seeds must be at least 1, got {self.random_seeds}")
        if not self.orders:
            raise ValueError("give at least one backfill order")
        if len(set(self.orders)) != len(self.orders):
            raise ValueError(f"backfill orders repeat: {[str(order) for order in self.orders]}")
        even_betas(self.beta_points)
        EvalConfig(metric=self.metric, memory_budget_mb=self.memory_budget_mb)


@dataclass(frozen=True)
class Embeddings:
    """One embedding table's rows in a given id order."""

    ids: np.ndarray
    vectors: np.ndarray
    table: pa.Table


def read_embeddings(uri: str, ids: np.ndarray | None = None, *, require: tuple[str, ...] = ()) -> Embeddings:
    """Read and validate a table; with ``ids``, its rows in that order (every id must be present)."""
    table = validate_embedding_table(read_table(uri), uri, require=require)
    if ids is not None:
        table = table.take(pa.array(rows_of(table.column(ID).to_numpy(), ids, uri)))
    return Embeddings(table.column(ID).to_numpy(), vectors_of(table), table)


@dataclass(frozen=True)
class LoadedTables:
    query_labels: np.ndarray
    gallery_labels: np.ndarray
    queries: dict[str, Embeddings]  # "old", "new" and optionally "psi"
    gallery: dict[str, Embeddings]  # "old", "new" and optionally "transformed"


def load_tables(inputs: EvalInputs) -> LoadedTables:
    """Old tables give the ids and labels; the other tables are matched to them by id."""
    q_old = read_embeddings(inputs.queries_old, require=(LABEL,))
    g_old = read_embeddings(inputs.gallery_old, require=(LABEL,))
    queries = {"old": q_old, "new": read_embeddings(inputs.queries_new, q_old.ids)}
    gallery = {"old": g_old, "new": read_embeddings(inputs.gallery_new, g_old.ids)}
    if inputs.psi_queries:
        queries["psi"] = read_embeddings(inputs.psi_queries, q_old.ids)
    if inputs.gallery_transformed:
        gallery["transformed"] = read_embeddings(inputs.gallery_transformed, g_old.ids)
    return LoadedTables(q_old.table.column(LABEL).to_numpy(), g_old.table.column(LABEL).to_numpy(), queries, gallery)


def method_spaces(method: str, tables: LoadedTables) -> BackfillSpaces:
    """The vectors a method scores with before and after an item is backfilled (see compat.recipes)."""
    recipe = get_recipe(method)
    q = {name: e.vectors for name, e in tables.queries.items()}
    g = {name: e.vectors for name, e in tables.gallery.items()}
    if recipe.query_strategy == Strategy.OLD:
        return BackfillSpaces.old(q["old"], g["old"])
    if recipe.query_strategy == Strategy.COMPATIBLE:
        if recipe.forward_transformation and "transformed" not in g:
            raise ValueError(f"method {method!r} serves transformed old embeddings: give --gallery-transformed")
        return BackfillSpaces.compatible(
            q["new"], g["transformed" if recipe.forward_transformation else "old"], g["new"]
        )
    psi = recipe.old_query_source == OldQuerySource.PSI
    if psi and "psi" not in q:
        raise ValueError(f"method {method!r} queries the old part with psi(new query): give --psi-queries")
    return BackfillSpaces.rank_merge(q["psi" if psi else "old"], g["old"], q["new"], g["new"])


def anchors(tables: LoadedTables, config: EvalConfig) -> dict[str, RetrievalResult]:
    """old/old and new/new, plus every cross test the inputs allow (``cross_tests``)."""
    q = {name: e.vectors for name, e in tables.queries.items()}
    g = {name: e.vectors for name, e in tables.gallery.items()}
    return cross_tests(
        tables.query_labels,
        tables.gallery_labels,
        old_queries=q["old"],
        new_queries=q["new"],
        old_gallery=g["old"],
        new_gallery=g["new"],
        transformed_gallery=g.get("transformed"),
        psi_queries=q.get("psi"),
        config=config,
    )


def _score_column(tables: LoadedTables, name: str) -> np.ndarray:
    for space in ("old", "transformed"):
        if space in tables.gallery and name in tables.gallery[space].table.schema.names:
            column = tables.gallery[space].table.column(name)
            if not pa.types.is_integer(column.type) and not pa.types.is_floating(column.type):
                raise ValueError(f"order column {name!r} must be numeric, found {column.type}")
            return column.to_numpy().astype(np.float64)
    raise ValueError(f"order column {name!r} is in neither the old nor the transformed gallery table")


def backfill_order(order: Order, tables: LoadedTables, config: OfflineConfig) -> np.ndarray:
    """Gallery positions, highest priority first (ties by ascending id)."""
    ids = tables.gallery["old"].ids
    if order.column is not None:
        return priority_order(_score_column(tables, order.column), ids)
    assert order.policy is not None  # an Order is a policy or a column
    old = tables.gallery["old"].vectors
    kwargs: dict = {"old": old, "seed": config.seed}
    if order.policy is Policy.UNCERTAINTY:
        if not config.transformation:
            raise ValueError("order 'uncertainty' needs the FastFill transformation artefact (--transformation)")
        head = load_model(config.transformation).module
        kwargs["transformation"] = head
        if head.uses_side_info:
            table = tables.gallery["old"].table
            if SIDE_INFO not in table.schema.names:
                raise ValueError(f"the transformation reads side-information; the old gallery has no {SIDE_INFO!r}")
            kwargs["side"] = vectors_of(table, SIDE_INFO)
    elif order.policy in (Policy.ENTROPY, Policy.LEAST_CONFIDENCE):
        if not config.old_model:
            raise ValueError(f"order {str(order)!r} needs the old model artefact (--old-model) for its classifier")
        classifier = load_model(config.old_model).classifier
        kwargs["classifier"] = (classifier.weight.detach().numpy(), classifier.bias.detach().numpy())
    return priority_order(priority_scores(order.policy, ids, **kwargs), ids)


def order_run(
    order: Order,
    spaces: BackfillSpaces,
    tables: LoadedTables,
    config: OfflineConfig,
    old_old: RetrievalResult,
    eval_config: EvalConfig,
) -> Run:
    """One order's backfill curve; for ``random`` with ``config.random_seeds > 1`` also the AUCs of the
    other seeds' orders."""

    def curve_of(run_config: OfflineConfig) -> BackfillCurve:
        return backfill_curve(
            spaces,
            backfill_order(order, tables, run_config),
            tables.query_labels,
            tables.gallery_labels,
            old_old.correct_top1,
            betas=even_betas(config.beta_points),
            config=eval_config,
        )

    curve = curve_of(config)
    seed_aucs = None
    if order.policy is Policy.RANDOM and config.random_seeds > 1:
        seed_aucs = {config.seed: (auc_mean(curve.betas, curve.top1), auc_mean(curve.betas, curve.map))}
        for seed in range(config.seed + 1, config.seed + config.random_seeds):
            other = curve_of(replace(config, seed=seed))
            seed_aucs[seed] = (auc_mean(other.betas, other.top1), auc_mean(other.betas, other.map))
    return Run(config.method, str(order), spaces.strategy, curve, seed_aucs)


def evaluate_tables(inputs: EvalInputs, config: OfflineConfig) -> dict:
    """Simulate a backfill offline: the anchors and one backfill curve per order for ``config.method``.

    Args:
        inputs: the query and gallery embedding tables (old and new; psi queries and the transformed gallery
            for the methods that use them); labels come from the old tables.
        config: the method, backfill orders, random seeds, metric and memory budget.

    Returns:
        A report dict (the :mod:`raybackfill.eval.report` schema); :func:`write_outputs` writes
        ``report.json``, ``report.md`` and ``backfill_curves.png``.

    Example:
        >>> report = evaluate_tables(
        ...     EvalInputs(queries_old="emb/query_v1", queries_new="emb/query_v2",
        ...                gallery_old="emb/gallery_v1", gallery_new="backfill/v2/new"),
        ...     OfflineConfig(method=Method.RANK_MERGE))  # doctest: +SKIP
    """
    eval_config = EvalConfig(metric=config.metric, protocol=Protocol.DISJOINT, memory_budget_mb=config.memory_budget_mb)
    tables = load_tables(inputs)
    spaces = method_spaces(config.method, tables)
    fixed = anchors(tables, eval_config)
    runs = [order_run(order, spaces, tables, config, fixed["old_old"], eval_config) for order in config.orders]
    return build_report(fixed, runs)


def output_files(report: Mapping) -> list[str]:
    """What ``write_outputs`` writes for this report: report.json, backfill_curves.png and report.md (the
    markdown tables), plus online_quality.png when the report has live readings from an online backfill and
    chain_curves.png when it has a chained upgrade's section (``chain``)."""
    online = [ONLINE_PLOT_FILE] if report.get("online", {}).get("live_readings") else []
    chain = [CHAIN_PLOT_FILE] if report.get("chain") else []
    return [REPORT_FILE, PLOT_FILE, MARKDOWN_FILE, *online, *chain]


def write_outputs(report: dict, out_uri: str) -> dict[str, str]:
    """Write ``output_files(report)`` under ``out_uri``; file name -> URI."""
    paths = {name: join(out_uri, name) for name in output_files(report)}
    save_report(report, paths[REPORT_FILE])
    plot_curves(report, paths[PLOT_FILE])
    if ONLINE_PLOT_FILE in paths:
        plot_online(report["online"], paths[ONLINE_PLOT_FILE])
    markdown = summary_table(report, markdown=True)
    if CHAIN_PLOT_FILE in paths:
        plot_chain(report["chain"], paths[CHAIN_PLOT_FILE])
        markdown += "\n\n" + chain_table(report["chain"], markdown=True)
    write_bytes(paths[MARKDOWN_FILE], (markdown + "\n").encode())
    return paths
