"""The backfill plan: every gallery item's rank, tier and location, never a copy of its row.

Why tiers instead of ``Dataset.sort``: a sort is an all-to-all shuffle that materialises the whole gallery
before the first batch reaches a GPU (no streaming), and Ray Data's checkpointing rejects it, so a killed job
would sort again from scratch. Ranking needs only one number per id, so the driver ranks the whole gallery in
memory (about 40 bytes per item while the plan is built) and cuts the ranking into tiers.

What the plan stores (``PLAN_COLUMNS``, about 10 bytes per item once compressed): for each item its id, rank
and *location* in the original gallery - the gallery file (an index into ``plan.json``'s file list), the row
group and the row within the group. Locating reads only the gallery's id column, one Ray task per file. The
backfill then reads each tier from the gallery itself, one row group at a time with column projection
(raybackfill.backfill.reads): no payload is ever copied, so plan storage is O(ids) instead of a second
gallery.

Order. Inside a tier, the rows are stored grouped by row group: groups in the order of their best
(lowest) rank, rows of a group by rank. That is the order the backfill reads and writes them (a row group
is read once per tier it has rows in, not once per row), and it is each tier's *track* of positions in the
ledger (raybackfill.backfill.ledger). What is guaranteed is tier granularity, as before: no item of tier t
is written before every item of tier t-1 is; inside a tier the order is by row group, best first. The
price of reading tiers in place: a row group with rows in k tiers is read k times (at most ``tiers``); a
gallery written with smaller row groups, or fewer tiers, reads less.

Atomicity. Files are written into a fresh attempt directory and ``plan.json`` (written last, never
overwritten) lists them, so a plan killed half-way is ignored and rebuilt, and a committed plan is reused by
every later run of the same backfill. The plan names the gallery files it located; a gallery rewritten
afterwards is refused when a row group no longer holds the planned ids.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raybackfill.backfill.policies import CLASSIFIER_POLICIES, OLD_EMBEDDING_POLICIES, priority_order, priority_scores
from raybackfill.backfill.reads import RowGroupRead
from raybackfill.data import storage
from raybackfill.data.loading import read_shards, write_quarantine
from raybackfill.data.schema import EMBEDDING, ID, SIDE_INFO, check_unique_ids, vectors_of
from raybackfill.data.storage import TableFiles
from raybackfill.types import Policy, Stage, locate_sorted, parse

logger = logging.getLogger(__name__)

PLAN_JSON = "plan.json"
PLAN_FORMAT = 2  # 2: locations into the gallery (format 1 copied the gallery rows into the plan)
RANK = "rank"
FILE = "file"  # index of the gallery file in Plan.gallery_files
ROW_GROUP = "row_group"
ROW = "row"  # row within the row group
PLAN_COLUMNS = (ID, RANK, FILE, ROW_GROUP, ROW)
PLAN_ROWS_PER_FILE = 1_000_000  # a tier's locations are cut into files of this many rows
# Gallery files whose id columns are read at once while locating (each task holds one file's id column).
LOCATE_IN_FLIGHT = 8


@dataclass(frozen=True)
class PlanConfig:
    """What decides the order; a committed plan is reused only by a run asking for the same one."""

    gallery: str
    old_embeddings: str
    policy: Policy = Policy.UNCERTAINTY
    tiers: int = 8
    seed: int = 0
    transformation: str | None = None  # FastFill artefact, for policy "uncertainty"
    old_model: str | None = None  # old backbone artefact (its classifier), for "entropy" / "least_confidence"

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", parse(Policy, self.policy))
        if self.tiers <= 0:
            raise ValueError(f"tiers must be positive, got {self.tiers}")
        if self.policy is Policy.UNCERTAINTY and not self.transformation:
            raise ValueError("policy 'uncertainty' needs the FastFill transformation (--transformation)")
        if self.policy in CLASSIFIER_POLICIES and not self.old_model:
            raise ValueError(f"policy {self.policy.value!r} needs the old model's classifier (--old-model)")


@dataclass(frozen=True)
class Tier:
    index: int
    rows: int
    files: list[str]  # URIs of the tier's location files (PLAN_COLUMNS), rows in the tier's track order


@dataclass(frozen=True)
class Plan:
    uri: str
    config: PlanConfig
    total: int  # gallery rows in the plan (ids with an old embedding and an image)
    tiers: list[Tier]
    gallery_files: list[str]  # the gallery files the locations point into (FILE indexes this list)
    # The old-embedding table as planned: (file, rows) in order; the instant phase's track counts its rows.
    old_embedding_files: list[tuple[str, int]]


def read_plan(uri: str) -> Plan | None:
    """The committed plan under ``uri``, or None when no plan was committed there."""
    json_uri = storage.join(uri, PLAN_JSON)
    if not storage.exists(json_uri):
        return None
    raw = json.loads(storage.read_bytes(json_uri))
    if raw.get("format") != PLAN_FORMAT:
        raise ValueError(
            f"{json_uri}: a plan of format {raw.get('format', 1)} (this raybackfill reads format {PLAN_FORMAT}, "
            f"which stores locations instead of gallery rows); finish that backfill with the version that "
            f"started it, or start a new --out"
        )
    tiers = [Tier(t["index"], t["rows"], [storage.join(uri, f) for f in t["files"]]) for t in raw["tiers"]]
    old = [(str(f), int(n)) for f, n in raw["old_embedding_files"]]
    return Plan(uri, PlanConfig(**raw["config"]), raw["total"], tiers, list(raw["gallery_files"]), old)


def ensure_plan(
    config: PlanConfig,
    uri: str,
    quarantine_uri: str,
    *,
    batch_size: int = 65_536,
    gallery: TableFiles | None = None,
    old_embeddings: TableFiles | None = None,
) -> Plan:
    """Reuse the plan committed under ``uri`` (it must be for the same config), or build and commit one.

    ``gallery`` and ``old_embeddings``: the config's tables already resolved by the caller (else resolved here).

    Args:
        config: the tables, policy and tiers.
        uri: the plan directory (``OUT/plan``).
        quarantine_uri: where ids that cannot be planned go (no image, or no old embedding).

    Returns:
        The committed plan.

    Example:
        >>> config = PlanConfig("data/gallery", "emb/v1", policy="id")
        >>> plan = ensure_plan(config, "out/plan", "out/quarantine")  # doctest: +SKIP
        >>> [t.rows for t in plan.tiers]  # doctest: +SKIP
    """
    plan = read_plan(uri)
    if plan is not None:
        if plan.config != config:
            raise ValueError(
                f"{uri}: holds a plan for {plan.config}, not {config}; use a new --out to change "
                f"the policy, tiers or inputs of a backfill"
            )
        return plan
    gallery = storage.open_table(gallery or config.gallery)
    old_embeddings = storage.open_table(old_embeddings or config.old_embeddings)
    old_files = [
        (uri, footer.num_rows) for uri, footer in zip(old_embeddings.shards, old_embeddings.footers, strict=True)
    ]
    ids, scores = score_gallery(config, batch_size=batch_size, old_embeddings=old_embeddings)
    located = locate_gallery(gallery)
    layout = plan_layout(ids, scores, located, config.tiers, quarantine_uri)
    attempt = storage.join(uri, f"attempt-{uuid.uuid4().hex[:12]}")
    tiers = _write_tiers(layout, attempt, config.tiers)
    prefix = len(uri.rstrip("/")) + 1
    manifest = {
        "format": PLAN_FORMAT,
        "config": dataclasses.asdict(config),
        "total": len(layout),
        "gallery_files": list(gallery.shards),
        "old_embedding_files": old_files,
        "tiers": [{"index": t.index, "rows": t.rows, "files": [f[prefix:] for f in t.files]} for t in tiers],
    }
    try:
        storage.write_bytes(storage.join(uri, PLAN_JSON), json.dumps(manifest, indent=1).encode(), if_exists="error")
    except FileExistsError:
        return ensure_plan(config, uri, quarantine_uri, batch_size=batch_size)  # a concurrent run committed first
    return Plan(uri, config, len(layout), tiers, list(gallery.shards), old_files)


def file_rows(table: TableFiles) -> list[tuple[str, int]]:
    """(file, rows) of each file of a table, in order (from the footers)."""
    return [(uri, footer.num_rows) for uri, footer in zip(table.shards, table.footers, strict=True)]


def _score_batch(batch: pa.Table, config: PlanConfig) -> dict[str, np.ndarray]:
    """One priority score per stored old embedding.

    For a policy that reads vectors, a row whose stored vectors are not finite has no usable old embedding:
    it gets the top score, so it is re-embedded first, instead of failing the whole plan. Models are loaded
    per batch (a task, not an actor): the batches are large (the policy models are small MLPs/heads) and
    tasks reuse warm workers.
    """
    # Imported here, not at the top: the workers that copy the gallery into tiers (_split_block) import this
    # module too, and importing torch there would cost each new worker seconds of CPU.
    from raybackfill.models.artifacts import load_model

    ids = batch.column(ID).to_numpy()
    transformation = None
    if config.policy is Policy.UNCERTAINTY:
        assert config.transformation is not None  # PlanConfig requires it for this policy
        transformation = load_model(config.transformation).module
    classifier = None
    if config.policy in CLASSIFIER_POLICIES:
        assert config.old_model is not None  # PlanConfig requires it for these policies
        head = load_model(config.old_model).classifier
        classifier = (head.weight.detach().numpy(), head.bias.detach().numpy())
    old = vectors_of(batch, EMBEDDING)
    uses_side = bool(getattr(transformation, "uses_side_info", False))
    side = vectors_of(batch, SIDE_INFO) if uses_side else None
    finite = np.isfinite(old).all(axis=1) & (True if side is None else np.isfinite(side).all(axis=1))
    scores = np.full(len(ids), np.inf)
    scores[finite] = priority_scores(
        config.policy,
        ids[finite],
        old=old[finite],
        side=None if side is None else side[finite],
        classifier=classifier,
        transformation=transformation,
        seed=config.seed,
    )
    return {ID: ids, "score": scores}


def score_gallery(
    config: PlanConfig, *, batch_size: int = 65_536, old_embeddings: TableFiles | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) of every stored old embedding: a Ray Data pass, collected to the driver (16 B/id).
    Policies of the id alone read only the id column, in the driver (8 MB for 1M ids: a Ray Data pass would
    start workers to read 512 MB of vectors these policies ignore)."""
    table = storage.open_table(old_embeddings or config.old_embeddings)
    if config.policy not in OLD_EMBEDDING_POLICIES:  # ranked by the id alone
        ids = table.read([ID]).column(ID).to_numpy().astype(np.int64)
        check_unique_ids(ids, config.old_embeddings)
        return ids, priority_scores(config.policy, ids, seed=config.seed).astype(np.float64)
    columns = [ID, EMBEDDING] + ([SIDE_INFO] if SIDE_INFO in table.schema.names else [])
    ds = read_shards(table, columns=columns).map_batches(
        _score_batch,  # type: ignore[arg-type]  # ray's UDF type omits fn_kwargs
        fn_kwargs={"config": config},
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=0.5,
    )
    parts = list(ds.iter_batches(batch_format="numpy", batch_size=None))
    ids = np.concatenate([p[ID] for p in parts]).astype(np.int64)
    scores = np.concatenate([p["score"] for p in parts]).astype(np.float64)
    check_unique_ids(ids, config.old_embeddings)
    return ids, scores


def locate_file(uri: str, file_index: int) -> pa.Table:
    """The id of every row of one gallery file with its location (id column only is read, row group by row
    group)."""
    fs, path = storage.resolve(uri)
    parts = []
    try:
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            for group in range(parquet.num_row_groups):
                ids = parquet.read_row_group(group, columns=[ID]).column(ID).cast(pa.int64())
                n = len(ids)
                parts.append(
                    pa.table(
                        {
                            ID: ids,
                            FILE: pa.array(np.full(n, file_index, dtype=np.int32)),
                            ROW_GROUP: pa.array(np.full(n, group, dtype=np.int32)),
                            ROW: pa.array(np.arange(n, dtype=np.int32)),
                        }
                    )
                )
    except (OSError, pa.ArrowInvalid) as err:
        raise storage.StorageError(f"{uri}: cannot read the id column ({err})") from err
    return pa.concat_tables(parts) if parts else _empty_locations()


_locate_file = ray.remote(num_cpus=0.25)(locate_file)


def _empty_locations() -> pa.Table:
    return pa.table({ID: pa.array([], pa.int64()), **{c: pa.array([], pa.int32()) for c in (FILE, ROW_GROUP, ROW)}})


def locate_gallery(gallery: str | TableFiles, *, in_flight: int = LOCATE_IN_FLIGHT) -> pa.Table:
    """Where every gallery row lives: ``id``, ``file`` (index into ``gallery.shards``), ``row_group``, ``row``,
    in file order. One Ray task per file reads its id column row group by row group; the driver gathers 20
    bytes per row."""
    gallery = storage.open_table(gallery)
    pending: dict[ray.ObjectRef, int] = {}
    done: dict[int, pa.Table] = {}
    for index, uri in enumerate(gallery.shards):
        if len(pending) >= in_flight:
            ready, _ = ray.wait(list(pending), num_returns=1)
            done[pending.pop(ready[0])] = ray.get(ready[0])
        pending[_locate_file.remote(uri, index)] = index
    for ref, index in pending.items():
        done[index] = ray.get(ref)
    tables = [done[i] for i in range(len(done))]
    return pa.concat_tables(tables) if tables else _empty_locations()


def plan_layout(
    ids: np.ndarray, scores: np.ndarray, located: pa.Table, tiers: int, quarantine_uri: str | None
) -> pa.Table:
    """The plan's rows (``PLAN_COLUMNS`` and ``tier``) in track order, from the scored ids and the gallery's
    locations: tier by tier; inside a tier, row groups by their best rank, rows of a group by rank.

    Gallery ids without a score ("unknown id") and scored ids without a gallery row ("no image") are
    quarantined at stage ``plan`` (when ``quarantine_uri`` is given). Ranks are dense over the planned items
    (0 .. total-1, highest priority first) and tiers are equal cuts of that ranking."""
    ids = np.asarray(ids, dtype=np.int64)
    gallery_ids = located.column(ID).to_numpy()
    check_unique_ids(gallery_ids, "gallery")
    rank_of = np.empty(len(ids), dtype=np.int64)
    rank_of[priority_order(scores, ids)] = np.arange(len(ids), dtype=np.int64)
    by_id = np.argsort(ids, kind="stable")
    where = locate_sorted(ids[by_id], gallery_ids, missing="mask")
    known = where >= 0
    missing = np.setdiff1d(ids, gallery_ids[known])
    if quarantine_uri is not None:
        if not known.all():
            unknown = gallery_ids[~known]
            reasons = ["unknown id: no stored old embedding"] * len(unknown)
            write_quarantine(quarantine_uri, unknown, reasons, stage=Stage.PLAN)
        if len(missing):
            write_quarantine(quarantine_uri, missing, ["no image in the gallery"] * len(missing), stage=Stage.PLAN)
    planned = located.filter(pa.array(known))
    scored_rank = rank_of[by_id][where[known]]
    dense = np.empty(len(scored_rank), dtype=np.int64)
    dense[np.argsort(scored_rank, kind="stable")] = np.arange(len(scored_rank), dtype=np.int64)
    tier_size = max(1, -(-len(dense) // tiers))
    tier = dense // tier_size
    group = (planned.column(FILE).to_numpy().astype(np.int64) << 32) | planned.column(ROW_GROUP).to_numpy()
    by_group = np.lexsort((dense, group, tier))
    starts = np.r_[True, (np.diff(tier[by_group]) != 0) | (np.diff(group[by_group]) != 0)]
    best = np.empty(len(dense), dtype=np.int64)  # the best (lowest) rank of each row's (tier, row group)
    best[by_group] = dense[by_group][np.flatnonzero(starts)[np.cumsum(starts) - 1]]
    order = np.lexsort((dense, best, tier))
    return (
        planned.take(pa.array(order))
        .append_column(RANK, pa.array(dense[order]))
        .append_column("tier", pa.array(tier[order]))
        .select([*PLAN_COLUMNS, "tier"])
    )


def _write_tiers(layout: pa.Table, attempt: str, tiers: int) -> list[Tier]:
    """Each tier's rows (already in track order) as files of at most ``PLAN_ROWS_PER_FILE`` locations."""
    tier = layout.column("tier").to_numpy()
    bounds = np.searchsorted(tier, np.arange(tiers + 1))
    out = []
    for t in range(tiers):
        rows = layout.slice(bounds[t], bounds[t + 1] - bounds[t]).select(list(PLAN_COLUMNS))
        directory = storage.join(attempt, f"tier-{t:05d}")
        files = [
            storage.write_shard(rows.slice(start, PLAN_ROWS_PER_FILE), directory, storage.shard_name(i))
            for i, start in enumerate(range(0, rows.num_rows, PLAN_ROWS_PER_FILE))
        ]
        out.append(Tier(t, rows.num_rows, files))
    return out


def read_tier(tier: Tier, start: int = 0, limit: int | None = None) -> pa.Table:
    """Locations of a tier's track from position ``start`` (at most ``limit`` rows); files wholly before
    ``start`` or past the limit are not read."""
    parts, offset = [], 0
    want = tier.rows - start if limit is None else min(limit, tier.rows - start)
    for uri in tier.files:
        if want <= 0:
            break
        rows = storage.read_footer(uri).num_rows
        if offset + rows > start:
            skip = max(0, start - offset)
            part = storage.read_shard(uri, list(PLAN_COLUMNS)).slice(skip, want)
            parts.append(part)
            want -= part.num_rows
        offset += rows
    if not parts:
        return pa.table({c: pa.array([], pa.int64()) for c in PLAN_COLUMNS})
    return pa.concat_tables(parts)


def tier_units(
    plan: Plan, tier: Tier, locations: pa.Table, start: int, bytes_per_row: list[float]
) -> list[RowGroupRead]:
    """Read units of a stretch of a tier's track (``locations`` = :func:`read_tier` from ``start``): one unit per
    run of rows in the same gallery row group. ``bytes_per_row``: per gallery file, for memory estimates."""
    n = locations.num_rows
    if not n:
        return []
    files = locations.column(FILE).to_numpy()
    groups = locations.column(ROW_GROUP).to_numpy()
    rows = locations.column(ROW).to_numpy().astype(np.int32)
    ids = locations.column(ID).to_numpy()
    cuts = np.flatnonzero((np.diff(files) != 0) | (np.diff(groups) != 0)) + 1
    units = []
    for a, b in zip(np.r_[0, cuts], np.r_[cuts, n], strict=True):
        f = int(files[a])
        units.append(
            RowGroupRead(
                plan.gallery_files[f], int(groups[a]), rows[a:b], start + int(a), tier.index, ids[a:b], bytes_per_row[f]
            )
        )
    return units
