"""The backfill orchestrator: plan, training, instant phase, then the re-embedding tier by tier, resumable.

1. Plan (raybackfill.backfill.plan): rank every gallery item with a policy, cut into tiers, and locate each
   item in the gallery (file, row group, row); no row is copied.
2. Training: an index kind that needs training (IVF, PQ, ...) gets its new space trained on a bounded sample
   before anything enters it: transformed old embeddings when there is a forward transformation, else a sample
   of the gallery embedded by the new encoder.
3. Instant phase (methods with a forward transformation): transform every stored old embedding into the
   new space (no images read) and upsert it as "transformed": the whole gallery is queryable in the new
   space within minutes.
4. Backfill phase: one Ray Data run over the planned rows, highest priority tier first, consumed in order
   (``preserve_order`` on this dataset only): read each row group with the rows still to do (raybackfill.
   backfill.reads) -> decode (bad images flagged, not dropped, so the sink can account for them) -> one actor
   pool running the new encoder -> the sink (raybackfill.backfill.sink) commits and upserts each batch as "new"
   into its tier's ledger track. The pool starts once for the whole phase, and the sink flushes at each tier
   boundary, so no item of tier t is written or upserted before every item of tier t-1 is in the index.

Inputs that are invalid as a whole (raybackfill.backfill.inputs) stop the job before it writes anything.

Resume: each track's marker (raybackfill.backfill.ledger) says how far it is committed; every stream starts
there (one small file per track is read, no batch file), and batches written but not upserted before a kill
are replayed (again at the end, for a shard that restarted from an older snapshot during the run). A budget
(``budget`` items or ``until`` a fraction of the gallery) stops a partial backfill; the next run continues from
the markers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import ray
from tqdm import tqdm

from raybackfill.backfill.inputs import check_inputs
from raybackfill.backfill.ledger import Ledger
from raybackfill.backfill.plan import Plan, PlanConfig, ensure_plan, file_rows, read_plan, read_tier, tier_units
from raybackfill.backfill.policies import CLASSIFIER_POLICIES
from raybackfill.backfill.reads import RowGroupRead, bytes_per_row, read_units, table_units
from raybackfill.backfill.rows import TIER, prepare_content
from raybackfill.backfill.sink import FINITE, BatchSink, PhaseStats
from raybackfill.compat.recipes import get_recipe
from raybackfill.data import storage
from raybackfill.data.loading import gallery_content
from raybackfill.data.schema import BAD_REASON, EMBEDDING, ID, SIDE_INFO
from raybackfill.data.storage import TableFiles
from raybackfill.embed.pipeline import EncoderInputs, PoolConfig, map_embed, map_transform, plan_inputs
from raybackfill.encoders import EntrypointTrust
from raybackfill.index.loading import DEFAULT_TRAIN_SAMPLE, index_config_of, sample_rows
from raybackfill.index.router import connect, get
from raybackfill.models.artifacts import read_spec
from raybackfill.types import Method, Phase, Policy, Space, Stage, parse

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackfillConfig:
    """One backfill. ``index=None`` only writes the outputs (no live index to update)."""

    gallery: str
    old_embeddings: str
    upgrade: str  # the new encoder artefact (any kind: raybackfill, TorchScript, torchvision, entrypoint...)
    out: str
    method: Method = Method.FASTFILL
    transformation: str | None = None  # forward transformation artefact (FCT / FastFill)
    old_model: str | None = None  # old backbone artefact: its classifier, for entropy / least_confidence
    policy: Policy = Policy.UNCERTAINTY
    seed: int = 0
    tiers: int = 8
    budget: int | None = None  # re-embed at most this many items in this run
    until: float | None = None  # stop once this fraction of the gallery is re-embedded
    max_bad_fraction: float = 0.01
    max_rate: float | None = None  # items/s per phase at most (None: as fast as it goes), to spare a busy service
    index: str | None = "raybackfill-router"
    pool: PoolConfig = field(default_factory=PoolConfig)
    transform_batch_size: int = 8192
    progress: bool = True
    trust: EntrypointTrust = field(default_factory=EntrypointTrust)  # entrypoints the user trusts
    train_sample: int = DEFAULT_TRAIN_SAMPLE  # new-space training vectors, for an index kind that needs training

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", parse(Method, self.method))
        object.__setattr__(self, "policy", parse(Policy, self.policy))
        if get_recipe(self.method).forward_transformation and not self.transformation:
            raise ValueError(
                f"method {self.method.value!r} transforms the stored embeddings first: pass --transformation"
            )
        if self.budget is not None and self.until is not None:
            raise ValueError("pass --budget or --until, not both")
        if self.budget is not None and self.budget < 0:
            raise ValueError(f"budget must be non-negative, got {self.budget}")
        if self.until is not None and not 0.0 <= self.until <= 1.0:
            raise ValueError(f"until must be a fraction in [0, 1], got {self.until}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.train_sample <= 0:
            raise ValueError(f"train_sample must be positive, got {self.train_sample}")
        if self.max_rate is not None and self.max_rate <= 0:
            raise ValueError(f"max_rate must be positive items/s (or None), got {self.max_rate}")
        self.plan_config()  # validates the policy and what it needs

    def plan_config(self) -> PlanConfig:
        return PlanConfig(
            gallery=self.gallery,
            old_embeddings=self.old_embeddings,
            policy=self.policy,
            tiers=self.tiers,
            seed=self.seed,
            transformation=self.transformation if self.policy is Policy.UNCERTAINTY else None,
            old_model=self.old_model if self.policy in CLASSIFIER_POLICIES else None,
        )


@dataclass(frozen=True)
class BackfillSummary:
    total: int  # items in the plan
    new: int  # items re-embedded so far (all runs)
    backfill_quarantined: int  # planned items the backfill quarantined so far (bad image, NaN output)
    quarantined: int  # ids quarantined so far, every stage (plan, transform, decode, embed)
    replayed: int  # rows re-sent to the index: on start (written but not upserted before a kill), after a
    # shard restart, and at the end (a shard that restarted between two upserts lost what its snapshot lacks)
    phases: list[PhaseStats]

    @property
    def complete(self) -> bool:
        return self.new + self.backfill_quarantined >= self.total


def run_backfill(config: BackfillConfig) -> BackfillSummary:
    """Run (or continue) a backfill: plan, instant phase (methods with a forward transformation), re-embedding.

    Ray must be initialised (:func:`raybackfill.runtime.init_ray`). Every batch is committed to the ledger
    under ``config.out`` before it is upserted into the index, so re-running with the same config after a
    kill, an error or a ``budget``/``until`` stop continues where the last run stopped and ends with every
    item exactly once.

    Args:
        config: the inputs, method, policy, stop condition and index; see :class:`BackfillConfig`.

    Returns:
        What this run did per phase and the totals (:attr:`BackfillSummary.complete` once every item is done).

    Example:
        >>> summary = run_backfill(BackfillConfig(
        ...     gallery="data/gallery", old_embeddings="emb/gallery_v1", upgrade="models/v2",
        ...     out="backfill/v2", method=Method.RANK_MERGE, policy=Policy.RANDOM))  # doctest: +SKIP
    """
    # Before any write. The input tables come back resolved (shards listed, footers read) for every later step.
    gallery, old_embeddings = check_inputs(
        config.gallery,
        config.old_embeddings,
        config.upgrade,
        config.transformation,
        old_model=config.old_model,
        trust=config.trust,
    )
    ledger = Ledger(config.out)
    router = connect(config.index) if config.index else None
    version = read_spec(config.upgrade).version
    if router is not None:
        get(router.report_error.remote(None))  # a new attempt: the last run's error is history
    try:
        started, built = time.monotonic(), read_plan(ledger.plan_uri) is None
        plan = ensure_plan(
            config.plan_config(), ledger.plan_uri, ledger.quarantine_uri, gallery=gallery, old_embeddings=old_embeddings
        )
        # The plan counts as a phase only in the run that built it (later runs reuse it).
        planned = PhaseStats("plan", plan.total, len(ledger.quarantined(Stage.PLAN)), time.monotonic() - started)
        phases = [planned] if built else []
        logger.info(
            "%s plan of %d items (%s, %d tiers) in %s",
            "built the" if built else "reusing the",
            plan.total,
            config.policy,
            len(plan.tiers),
            ledger.plan_uri,
        )
        replayed = ledger.replay(router, version) if router is not None else 0
        if replayed:
            logger.warning("re-sent %d ledger rows the index had lost (a shard restarted)", replayed)
        if router is not None:
            _train_new_space(config, router, gallery, old_embeddings, version)
        if get_recipe(config.method).forward_transformation:
            _set_phase(router, Phase.INSTANT)
            phases.append(_logged(_instant_phase(config, plan, old_embeddings, ledger, router, version)))
        _set_phase(router, Phase.BACKFILL)
        phases.append(_logged(_backfill_phase(config, gallery, plan, ledger, router, version)))
        if router is not None:  # cheap when the index matches the ledger (counts are compared first)
            replayed += sum(p.replayed for p in phases) + ledger.replay(router, version)
    except Exception as err:
        logger.error("backfill stopped: %s (re-run the same command to continue)", err)
        if router is not None:
            get(router.report_error.remote(f"backfill: {err}"))
            _set_phase(router, Phase.PAUSED)
        raise
    # The tier markers count what the tiers hold (each position once); no batch file is read.
    tracks = [ledger.track(ledger.tier_uri(tier.index)) for tier in plan.tiers]
    summary = BackfillSummary(
        total=plan.total,
        new=sum(t.items for t in tracks),
        backfill_quarantined=sum(t.quarantined for t in tracks),
        quarantined=len(np.unique(ledger.quarantined(*Stage))),
        replayed=replayed,
        phases=phases,
    )
    _set_phase(router, Phase.DONE if summary.complete else Phase.PAUSED)
    logger.info(
        "backfill %s: %d of %d items in the new space, %d quarantined",
        "complete" if summary.complete else "paused",
        summary.new,
        summary.total,
        summary.quarantined,
    )
    return summary


def _train_new_space(
    config: BackfillConfig, router, gallery: TableFiles, old_embeddings: TableFiles, version: str
) -> None:
    """Train the index's new space before its first upsert, when its kind needs training and nothing entered it
    yet, on :func:`new_space_sample`."""
    health = get(router.health.remote())
    if not index_config_of(health).needs_training or health["new_space"] is not None:
        return
    started = time.monotonic()
    vectors = new_space_sample(config, gallery, old_embeddings)
    get(router.train.remote(Space.NEW, vectors, version))
    logger.info("trained the new space on %d vectors in %.1fs", len(vectors), time.monotonic() - started)


def new_space_sample(config: BackfillConfig, gallery: TableFiles, old_embeddings: TableFiles) -> np.ndarray:
    """New-space vectors to train an index on: for a method with a forward transformation, a sample of the stored
    old embeddings transformed (the vectors the instant phase sends first); else a sample of the gallery embedded
    by the new encoder now (those items are embedded again in plan order later). The sample is bounded
    (``config.train_sample``) and uniform over the table (raybackfill.index.loading.sample_rows); rows that cannot
    be prepared or give non-finite vectors are left out."""
    if config.transformation is not None and get_recipe(config.method).forward_transformation:
        columns = _transform_columns(config.transformation)
        sample = sample_rows(old_embeddings, config.train_sample, columns, seed=config.seed)
        ds = map_transform(ray.data.from_arrow(sample), config.transformation, config.pool)
    else:
        inputs = plan_inputs({EMBEDDING: config.upgrade}, gallery, config.trust)
        sample = sample_rows(gallery, config.train_sample, [ID, inputs.content], seed=config.seed)
        ds = ray.data.from_arrow(sample).map_batches(
            prepare_content,  # type: ignore[arg-type]  # ray's UDF type omits fn_kwargs
            fn_kwargs={"content": inputs.content, "preprocessing": inputs.preprocessing},
            batch_format="numpy",
            batch_size=config.pool.batch_size,
            num_cpus=0.5,
        )
        ds = map_embed(ds, inputs, config.pool)
    parts = []
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        usable = batch[FINITE] & (batch[BAD_REASON] == "" if BAD_REASON in batch else True)
        parts.append(batch[EMBEDDING][usable])
    if not parts or not sum(len(p) for p in parts):
        raise ValueError(f"no usable vector in a sample of {sample.num_rows} items to train the new space on")
    return np.concatenate(parts)


def _logged(stats: PhaseStats) -> PhaseStats:
    logger.info(
        "%s phase: %d items, %d quarantined in %.1fs (%.0f items/s)",
        stats.name,
        stats.items,
        stats.quarantined,
        stats.seconds,
        stats.rate,
    )
    return stats


def _sink(
    config: BackfillConfig, ledger: Ledger, router, state: Space, version: str, stats: PhaseStats, bar: tqdm
) -> BatchSink:
    """The sink of one phase: ``state`` is the space its batches enter."""
    return BatchSink(
        ledger,
        router,
        state=state,
        version=version,
        stats=stats,
        max_bad_fraction=config.max_bad_fraction,
        bar=bar,
        max_rate=config.max_rate,
    )


def _set_phase(router, phase: Phase) -> None:
    if router is not None:
        get(router.set_phase.remote(phase))


def tier_runs(tiers: np.ndarray) -> list[tuple[int, int, int]]:
    """(tier, start, stop) of each run of equal values in a batch's tier column, in batch order."""
    bounds = np.r_[0, np.flatnonzero(np.diff(tiers)) + 1, len(tiers)] if len(tiers) else np.zeros(1, np.int64)
    return [(int(tiers[a]), int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _bar(config: BackfillConfig, name: str, total: int) -> tqdm:
    return tqdm(total=total, desc=name, unit="item", disable=not config.progress, dynamic_ncols=True)


def _instant_phase(
    config: BackfillConfig, plan: Plan, old_embeddings: TableFiles, ledger: Ledger, router, version: str
) -> PhaseStats:
    """Transform the stored old embeddings into the new space, from where the transformed track stopped."""
    stats = PhaseStats("instant")
    now = file_rows(old_embeddings)
    if now != plan.old_embedding_files:
        changed = next((f for f, g in zip(now, plan.old_embedding_files, strict=False) if f != g), None)
        raise storage.StorageError(
            f"{old_embeddings.uri}: the table changed since the plan was built ({len(plan.old_embedding_files)} "
            f"files then, {len(now)} now; first difference: {changed}); the instant phase counts its rows by "
            f"position: restore the table, or start a new --out"
        )
    state = ledger.track(ledger.transformed_uri)
    total = old_embeddings.num_rows
    if state.position >= total:
        return stats
    assert config.transformation is not None  # BackfillConfig requires it for a forward transformation
    columns = _transform_columns(config.transformation)
    units = table_units(old_embeddings, columns, start=state.position)
    ds = read_units(units, columns, old_embeddings.schema, config.transform_batch_size)
    ds = map_transform(ds, config.transformation, replace(config.pool, batch_size=config.transform_batch_size))
    # In track order, so what is committed is always a prefix of the old table (the ledger's marker).
    ds.context.execution_options.preserve_order = True
    with _bar(config, "instant (transform)", total - state.position) as bar:
        sink = _sink(config, ledger, router, Space.TRANSFORMED, version, stats, bar)
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            sink.consume(batch, ledger.transformed_uri)
        sink.flush()
    return stats


def _transform_columns(transformation: str) -> list[str]:
    return [ID, EMBEDDING] + ([SIDE_INFO] if read_spec(transformation).dims.get("side") else [])


def backfill_limit(config: BackfillConfig, total: int, done: int) -> int:
    """How many more items this run may re-embed (quarantined items count: they were processed)."""
    if config.budget is not None:
        return config.budget
    if config.until is not None:
        return max(0, math.ceil(config.until * total) - done)
    return total


def _backfill_phase(
    config: BackfillConfig, gallery: TableFiles, plan: Plan, ledger: Ledger, router, version: str
) -> PhaseStats:
    """Re-embed the images tier by tier in one Ray Data run; each tier is in the index before the next starts."""
    stats = PhaseStats("backfill")
    tracks = {tier.index: ledger.track(ledger.tier_uri(tier.index)) for tier in plan.tiers}
    left = backfill_limit(config, plan.total, sum(s.position for s in tracks.values()))
    per_row = _bytes_per_row(plan, gallery)
    units: list[RowGroupRead] = []
    todo = 0
    for tier in plan.tiers:
        start = tracks[tier.index].position
        if start >= tier.rows or left <= 0:  # a tier with nothing left to do is not read at all
            continue
        locations = read_tier(tier, start, left)
        left -= locations.num_rows
        todo += locations.num_rows
        units += tier_units(plan, tier, locations, start, per_row)
    if not units:
        return stats
    inputs = plan_inputs({EMBEDDING: config.upgrade}, gallery, config.trust)
    ds = backfill_stream(units, gallery.schema, inputs, config.pool)
    with _bar(config, "backfill (re-embed)", todo) as bar:
        sink = _sink(config, ledger, router, Space.NEW, version, stats, bar)
        batches = ds.iter_batches(batch_format="numpy", batch_size=None)
        consume_in_tier_order(
            batches, sink, ledger, lambda t: bar.set_description(f"backfill tier {t + 1}/{len(plan.tiers)}")
        )
    return stats


def _bytes_per_row(plan: Plan, gallery: TableFiles) -> list[float]:
    """Per gallery file of the plan, its bytes per row (id and content columns); a file of the plan that is gone
    from the gallery is refused by name, rows added since the plan are not part of this backfill."""
    footers = dict(zip(gallery.shards, gallery.footers, strict=True))
    gone = [f for f in plan.gallery_files if f not in footers]
    if gone:
        raise storage.StorageError(
            f"{gone[0]}: the plan reads this gallery file, which is no longer in {gallery.uri} "
            f"({len(gone)} file(s) gone); restore it, or start a new --out"
        )
    added = len(footers) - len(plan.gallery_files)
    if added > 0:
        logger.warning("%s: %d file(s) added since the plan was built are not in this backfill", gallery.uri, added)
    content = gallery_content(gallery)
    return [bytes_per_row(footers[f], [ID, content]) for f in plan.gallery_files]


def backfill_stream(
    units: list[RowGroupRead], schema: pa.Schema, inputs: EncoderInputs, pool: PoolConfig
) -> ray.data.Dataset:
    """One dataset that reads the planned rows of ``units`` from the gallery (``schema``: its schema), prepares
    and embeds them with one actor pool, and yields its batches in the order of ``units``."""
    ds = read_units(units, [ID, inputs.content], schema, pool.batch_size)
    ds = ds.map_batches(
        prepare_content,  # type: ignore[arg-type]  # ray's UDF type omits fn_kwargs
        fn_kwargs={"content": inputs.content, "preprocessing": inputs.preprocessing},
        batch_format="numpy",
        batch_size=pool.batch_size,
        num_cpus=0.5,
    )
    ds = map_embed(ds, inputs, pool)
    # ds.context is this dataset's own copy of the DataContext: the setting does not leak into other datasets.
    ds.context.execution_options.preserve_order = True
    return ds


def consume_in_tier_order(
    batches: Iterable[dict[str, np.ndarray]], sink: BatchSink, ledger: Ledger, on_tier: Callable[[int], None]
) -> None:
    """Write each row to its tier's ledger directory; flush the sink before a tier's first write, so every item
    of the previous tier is in the index first. A batch may span a tier boundary; a stream whose tiers go down
    is refused (the order was lost upstream: a lower tier would be written after a higher one)."""
    current = -1
    for batch in batches:
        for tier, start, stop in tier_runs(batch[TIER]):
            if tier != current:
                if tier < current:
                    raise RuntimeError(f"backfill stream out of tier order: tier {tier} after tier {current}")
                sink.flush()
                current = tier
                on_tier(tier)
            sink.consume({k: v[start:stop] for k, v in batch.items()}, ledger.tier_uri(tier))  # views, no copy
    sink.flush()


def summary_table(summary: BackfillSummary) -> str:
    """The end-of-run table: per phase items, quarantined, time and rate; then the totals."""
    lines = [f"{'phase':<10} {'items':>10} {'quarantined':>12} {'seconds':>9} {'items/s':>9}"]
    for p in summary.phases:
        lines.append(f"{p.name:<10} {p.items:>10} {p.quarantined:>12} {p.seconds:>9.1f} {p.rate:>9.1f}")
    state = "complete" if summary.complete else "partial (re-run the same command to continue)"
    lines.append(
        f"re-embedded {summary.new} of {summary.total} items; {summary.quarantined} quarantined in all; "
        f"{summary.replayed} rows replayed into the index; backfill {state}"
    )
    return "\n".join(lines)
