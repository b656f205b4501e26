"""`backfill --dry-run`: what a backfill would do and cost, measured on a sample on the cluster it would run on,
without writing anything (no plan, no ledger, no quarantine, no index call).

Each phase's stage is run on a sample through the same Ray Data stages the backfill uses (the reader, the
encoder's preprocessing and actor pool, the transformation's actor pool, the plan's scoring pass) with the same
pool settings, and the batches are timestamped as they reach the driver. A phase of n items is then estimated
as ``first + (n - first_rows) / rate``: ``first`` is the time to the first batch (the pool's start and one
batch), ``rate`` the steady rate after it (rows after the first batch over the time they took). A sample that
yields one batch only has no steady rate: its rate is taken as ``rows / first`` (start-up included), which
over-estimates. The plan reads the gallery's id column to locate every item (raybackfill.backfill.plan): that
work is done on the first gallery shards in the driver and its time scaled to the gallery's rows.

Bytes are measured too: the sample's outputs are encoded as the backfill's Parquet files in memory, and the
bytes per row scale to the phase; the plan's bytes per item are those of the sample's locations (ids, ranks,
file, row group, row) encoded the same way, so they over-estimate for a small sample (the file's fixed
overhead is shared by fewer rows).
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raybackfill.backfill.inputs import check_inputs
from raybackfill.backfill.plan import PLAN_COLUMNS, RANK, locate_file, score_gallery
from raybackfill.backfill.policies import OLD_EMBEDDING_POLICIES
from raybackfill.backfill.run import BackfillConfig
from raybackfill.compat.recipes import get_recipe
from raybackfill.data import storage
from raybackfill.data.loading import prepare_rows, read_gallery, read_shards
from raybackfill.data.schema import EMBEDDING, ID, SIDE_INFO, UNCERTAINTY, embedding_table
from raybackfill.data.storage import TableFiles
from raybackfill.embed.pipeline import map_embed, map_transform, plan_inputs
from raybackfill.models.artifacts import read_spec

logger = logging.getLogger(__name__)

SAMPLE_BATCHES = 6  # batches each timed stage streams (the first one pays the pool's start)


@dataclass(frozen=True)
class StreamTiming:
    """A timed pass of a sample: rows, time to the first batch (and its rows) and the steady rate after it."""

    rows: int
    first_seconds: float
    first_rows: int
    rate: float  # rows/s after the first batch (or rows / first_seconds when there was one batch)
    batches: int

    def seconds_for(self, items: int) -> float:
        """The estimated time of ``items`` rows through the same stage."""
        if items <= 0:
            return 0.0
        return self.first_seconds + max(items - self.first_rows, 0) / self.rate


def time_stream(ds: ray.data.Dataset) -> tuple[StreamTiming, list[dict[str, np.ndarray]]]:
    """Run ``ds`` to the end, timestamping each batch as it reaches the driver; returns the timing and batches."""
    start = time.monotonic()
    arrivals, parts = [], []
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        arrivals.append((time.monotonic() - start, len(batch[ID])))
        parts.append(batch)
    if not arrivals:
        raise ValueError("the sample produced no rows to time")
    rows = sum(n for _, n in arrivals)
    first_seconds, first_rows = arrivals[0]
    if len(arrivals) > 1 and arrivals[-1][0] > first_seconds:
        rate = (rows - first_rows) / (arrivals[-1][0] - first_seconds)
    else:
        rate = rows / max(first_seconds, 1e-9)
    return StreamTiming(rows, first_seconds, first_rows, rate, len(arrivals)), parts


@dataclass(frozen=True)
class PhaseEstimate:
    name: str
    items: int
    seconds: float
    bytes_written: int
    timing: StreamTiming | None = None  # of the main stage (None: nothing timed, e.g. an id-only policy)


@dataclass(frozen=True)
class DryRunReport:
    """What ``backfill --dry-run`` prints (see :meth:`table`)."""

    gallery_rows: int
    old_rows: int
    planned: int  # ids with both an old embedding and a gallery row
    to_reembed: int  # after --budget / --until
    tiers: int
    tier_size: int
    phases: list[PhaseEstimate]
    cluster: dict[str, float]

    @property
    def plan_bytes(self) -> int:
        """The plan's tier files: ids, ranks and locations of the planned items (no gallery row is copied)."""
        return sum(p.bytes_written for p in self.phases if p.name == "plan")

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.phases)

    @property
    def storage_bytes(self) -> int:
        """What the run writes in all: the plan's tiers and every phase's outputs."""
        return sum(p.bytes_written for p in self.phases)

    def table(self) -> str:
        lines = [
            f"dry run (nothing written): {self.planned} items planned of {self.gallery_rows} gallery rows and "
            f"{self.old_rows} old embeddings; {self.to_reembed} to re-embed in this run; {self.tiers} tiers of "
            f"{self.tier_size}",
            f"cluster: {self.cluster.get('CPU', 0):g} CPUs, {self.cluster.get('GPU', 0):g} GPUs",
            f"{'phase':<10}{'items':>10}{'est. time':>12}{'rate (items/s)':>16}{'written':>12}  sample",
        ]
        for p in self.phases:
            t = p.timing
            rate = f"{t.rate:,.0f}" if t else "-"
            sample = f"{t.rows} rows, first batch {t.first_seconds:.1f} s" if t else "-"
            lines.append(
                f"{p.name:<10}{p.items:>10}{_duration(p.seconds):>12}{rate:>16}{_size(p.bytes_written):>12}  {sample}"
            )
        lines.append(
            f"total: {_duration(self.seconds)}; storage: {_size(self.storage_bytes)} "
            f"(plan {_size(self.plan_bytes)}, outputs {_size(self.storage_bytes - self.plan_bytes)})"
        )
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parquet_bytes(table: pa.Table) -> int:
    """The size of ``table`` written as one Parquet file with the defaults the backfill's shards use, in memory."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.tell()


def _bytes_per_row(parts: list[dict[str, np.ndarray]], version: str) -> float:
    """Bytes per row of the sample's outputs as the backfill writes them (id, embedding, uncertainty, model)."""
    ids = np.concatenate([p[ID] for p in parts])
    vectors = np.concatenate([p[EMBEDDING] for p in parts])
    uncertainty = np.concatenate([p[UNCERTAINTY] for p in parts]) if UNCERTAINTY in parts[0] else None
    table = embedding_table(ids, vectors, uncertainty=uncertainty, model=version)
    return parquet_bytes(table) / max(len(ids), 1)


def _first_shards(table: TableFiles, rows: int) -> TableFiles:
    """The table's first shards holding at least ``rows`` rows (a sample the readers take as they are)."""
    taken, count = [], 0
    for shard, footer in zip(table.shards, table.footers, strict=True):
        taken.append((shard, footer))
        count += footer.num_rows
        if count >= rows:
            break
    return TableFiles(table.uri, tuple(s for s, _ in taken), tuple(f for _, f in taken))


def _file_bytes(table: TableFiles) -> int:
    fs, _ = storage.resolve(table.uri)
    return sum(fs.get_file_info(storage.resolve(shard)[1]).size for shard in table.shards)


def dry_run(config: BackfillConfig, *, sample_batches: int = SAMPLE_BATCHES) -> DryRunReport:
    """Estimate ``config``'s backfill on the cluster Ray is attached to, writing nothing.

    Args:
        config: the backfill as it would run (its pool, batch sizes, policy, method and stop condition).
        sample_batches: batches each timed stage streams.

    Returns:
        The :class:`DryRunReport`: items, tiers, time and bytes per phase, the storage the run needs.

    Examples:
        >>> config = BackfillConfig(gallery="data/gallery", old_embeddings="emb/v1", upgrade="models/v2",
        ...                         out="backfill/v2", method="rank_merge", policy="random")  # doctest: +SKIP
        >>> print(dry_run(config).table())  # doctest: +SKIP
    """
    if sample_batches < 2:
        raise ValueError(f"sample_batches must be at least 2 (one batch has no steady rate), got {sample_batches}")
    gallery, old = check_inputs(
        config.gallery, config.old_embeddings, config.upgrade, config.transformation,
        old_model=config.old_model, trust=config.trust,
    )  # fmt: skip
    gallery_ids = gallery.read([ID]).column(ID).to_numpy()
    old_ids = old.read([ID]).column(ID).to_numpy()
    planned = len(np.intersect1d(gallery_ids, old_ids))
    to_reembed = planned
    if config.budget is not None:
        to_reembed = min(planned, config.budget)
    elif config.until is not None:
        to_reembed = min(planned, math.ceil(config.until * planned))
    tier_size = max(1, -(-planned // config.tiers))
    phases = [_plan_phase(config, gallery, old, planned, len(gallery_ids), sample_batches)]
    if get_recipe(config.method).forward_transformation:
        phases.append(_instant_phase(config, old, sample_batches))
    phases.append(_reembed_phase(config, gallery, to_reembed, sample_batches))
    resources = ray.cluster_resources()
    return DryRunReport(
        gallery_rows=len(gallery_ids),
        old_rows=len(old_ids),
        planned=planned,
        to_reembed=to_reembed,
        tiers=config.tiers,
        tier_size=tier_size,
        phases=phases,
        cluster={k: float(resources.get(k, 0)) for k in ("CPU", "GPU")},
    )


def _plan_phase(
    config: BackfillConfig, gallery: TableFiles, old: TableFiles, planned: int, gallery_rows: int, sample_batches: int
) -> PhaseEstimate:
    """The scoring pass (policies that read the old embeddings) and the pass that locates every gallery item."""
    seconds = 0.0
    if config.policy in OLD_EMBEDDING_POLICIES:
        sample = _first_shards(old, 1)
        started = time.monotonic()
        score_gallery(config.plan_config(), old_embeddings=sample)  # the real scoring pass over a sample: no write
        # linear in the rows, start-up included: an over-estimate when the sample is a small share of the table
        seconds += (time.monotonic() - started) * old.num_rows / max(sample.num_rows, 1)
    sample = _first_shards(gallery, sample_batches * config.pool.batch_size)
    # The locating work (the id column of each file) over the first shards, in this process: the run does the
    # same per file in Ray tasks, several at once, so this over-estimates on a cluster with free CPUs.
    started = time.monotonic()
    located = pa.concat_tables([locate_file(uri, i) for i, uri in enumerate(sample.shards)])
    seconds += (time.monotonic() - started) * gallery_rows / max(sample.num_rows, 1)
    rows = located.append_column(RANK, pa.array(np.arange(located.num_rows, dtype=np.int64))).select(list(PLAN_COLUMNS))
    plan_bytes = int(parquet_bytes(rows) / max(rows.num_rows, 1) * planned)
    return PhaseEstimate("plan", planned, seconds, plan_bytes)


def _instant_phase(config: BackfillConfig, old: TableFiles, sample_batches: int) -> PhaseEstimate:
    """The transformation over the stored old embeddings (every one of them, as the instant phase does)."""
    assert config.transformation is not None  # BackfillConfig requires it for a forward transformation
    batch_size = config.transform_batch_size
    rows = sample_batches * batch_size
    sample = _first_shards(old, rows)
    columns = [ID, EMBEDDING] + ([SIDE_INFO] if read_spec(config.transformation).dims.get("side") else [])
    ds = read_shards(sample, columns=columns, rows_per_block=batch_size).limit(rows)
    ds = map_transform(ds, config.transformation, replace(config.pool, batch_size=batch_size))
    timing, parts = time_stream(ds)
    per_row = _bytes_per_row(parts, read_spec(config.transformation).version)
    items = old.num_rows
    return PhaseEstimate("instant", items, timing.seconds_for(items), int(per_row * items), timing)


def _reembed_phase(config: BackfillConfig, gallery: TableFiles, items: int, sample_batches: int) -> PhaseEstimate:
    """The new encoder over the gallery's images or texts, with the backfill's pool and preprocessing."""
    rows = sample_batches * config.pool.batch_size
    sample = _first_shards(gallery, rows)
    plan = plan_inputs({EMBEDDING: config.upgrade}, sample, config.trust)
    ds = read_gallery(sample, rows_per_block=config.pool.batch_size).select_columns([ID, plan.content]).limit(rows)
    ds = map_embed(prepare_rows(ds, plan.preprocessing, batch_size=config.pool.batch_size), plan, config.pool)
    timing, parts = time_stream(ds)
    per_row = _bytes_per_row(parts, read_spec(config.upgrade).version)
    return PhaseEstimate("backfill", items, timing.seconds_for(items), int(per_row * items), timing)
