"""The paired sample: N gallery items embedded by the old and the new encoder in one Ray Data pass.

The ids are chosen in the driver from the id column (and the stratification column) alone: uniformly, or in
proportion to each class's share of the gallery (largest remainders, so the counts add up to N exactly). The
rows are then streamed once through the gallery reader, prepared by each encoder's declared preprocessing (one
decode when the encoders prepare alike) and embedded by an actor pool holding both encoders (and the
side-information model when given): :mod:`raybackfill.embed.pipeline` is reused as is. Rows that do not decode
or embed to NaN/inf are quarantined under ``OUT/_quarantine`` with their reason; the table holds the others.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raybackfill.adapters.paired import NEW, NEW_MODEL, OLD, OLD_MODEL, SIDE
from raybackfill.data import storage
from raybackfill.data.loading import keep_only, prepare_rows, quarantined_ids, read_gallery, write_quarantine
from raybackfill.data.schema import ID, LABEL, SchemaError, check_unique_ids, fixed_size_list
from raybackfill.embed.pipeline import PoolConfig, map_embed, plan_inputs
from raybackfill.encoders import EntrypointTrust
from raybackfill.models.artifacts import read_spec
from raybackfill.types import ENCODER_STAGES, Stage

logger = logging.getLogger(__name__)

SAMPLE_JSON = "_sample.json"


@dataclass(frozen=True)
class SampleResult:
    uri: str
    rows: int  # pairs written
    requested: int  # ids chosen
    quarantined: int  # chosen ids that could not be embedded
    per_class: dict[int, int] | None = None  # stratified: ids chosen per class


def choose_ids(ids: np.ndarray, n: int, *, strata: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """``n`` distinct ids (sorted), uniformly at random or stratified by ``strata`` (one value per id).

    Stratified: class c gets ``n * count_c / total`` ids rounded down, and the ids left over go one each to the
    classes with the largest remainders (ties to the smaller class value), so the sizes sum to ``n``. Each class
    draws from its own generator seeded by ``(seed, class)``, over its ids sorted: the choice depends neither on
    the table's row order nor on the other classes. ``n`` at or above the number of ids takes them all.

    Examples:
        >>> choose_ids(np.arange(10), 3, seed=0).tolist() == choose_ids(np.arange(10)[::-1], 3, seed=0).tolist()
        True
        >>> ids = np.arange(8); strata = np.array([0, 0, 0, 0, 0, 0, 1, 1])
        >>> int(np.isin(choose_ids(ids, 4, strata=strata), [6, 7]).sum())  # 4 * 2/8 = 1 of class 1
        1
    """
    ids = np.asarray(ids, dtype=np.int64)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    check_unique_ids(ids, "the gallery")
    if n >= len(ids):
        return np.sort(ids)
    if strata is None:
        ordered = np.sort(ids)
        return np.sort(ordered[np.random.default_rng([seed]).permutation(len(ordered))[:n]])
    strata = np.asarray(strata, dtype=np.int64)
    classes, counts = np.unique(strata, return_counts=True)
    exact = n * counts / counts.sum()
    quota = np.floor(exact).astype(np.int64)
    left = n - int(quota.sum())
    # largest remainder first; np.lexsort sorts by the last key first: remainder descending, then class ascending
    quota[np.lexsort((classes, -(exact - quota)))[:left]] += 1
    chosen = []
    for label, take in zip(classes, quota, strict=True):
        members = np.sort(ids[strata == label])
        chosen.append(members[np.random.default_rng([seed, int(label)]).permutation(len(members))[:take]])
    return np.sort(np.concatenate(chosen))


def paired_sample(
    gallery_uri: str,
    old_encoder: str,
    new_encoder: str,
    n: int,
    out_uri: str,
    *,
    stratify_by: str | None = None,
    seed: int = 0,
    side_info_encoder: str | None = None,
    pool: PoolConfig | None = None,
    trust: EntrypointTrust | None = None,
) -> SampleResult:
    """Choose ``n`` gallery ids and write their old and new embeddings as one paired table at ``out_uri``.

    Args:
        gallery_uri: the gallery table (``id`` + ``image`` or ``text``; ``label`` is carried over when present).
        old_encoder: the old encoder artefact (any kind) -> column ``old``.
        new_encoder: the new encoder artefact -> column ``new``.
        n: items to sample (all when the gallery has fewer).
        out_uri: where the paired table is written (a new table; refused if it has shards).
        stratify_by: a gallery column of integer classes to stratify on (e.g. ``label``); None: uniform.
        seed: the sampling seed.
        side_info_encoder: the old model's side-information artefact -> column ``side`` (same pass).
        pool: the embedding actors' sizing.
        trust: the entrypoints the user trusts.

    Returns:
        The :class:`SampleResult`.

    Examples:
        >>> paired_sample("gallery/", "models/v1", "models/v2", 5000, "pairs/", stratify_by="label")  # doctest: +SKIP
    """
    pool = pool or PoolConfig()
    gallery = storage.open_table(gallery_uri)
    if storage.exists(out_uri) and storage.list_shards(out_uri):
        raise storage.ShardExistsError(f"{out_uri}: already holds a table; write the sample to a new URI")
    models = {OLD: old_encoder, NEW: new_encoder} | ({SIDE: side_info_encoder} if side_info_encoder else {})
    plan = plan_inputs(models, gallery, trust)  # refuses a wrong modality or an untrusted entrypoint up front
    names = gallery.schema.names
    if stratify_by is not None and stratify_by not in names:
        raise SchemaError(f"{gallery.uri}: no column {stratify_by!r} to stratify by (columns: {', '.join(names)})")
    index = gallery.read([ID] + ([stratify_by] if stratify_by else []))
    strata = None
    if stratify_by is not None:
        column = index.column(stratify_by)
        if column.null_count or not pa.types.is_integer(column.type):
            raise SchemaError(
                f"{gallery.uri}: column {stratify_by!r} must hold integer classes without nulls to stratify by "
                f"(found {column.type}, {column.null_count} nulls)"
            )
        strata = column.to_numpy()
    ids = index.column(ID).to_numpy()
    chosen = choose_ids(ids, n, strata=strata, seed=seed)
    per_class = None
    if strata is not None:
        labels, counts = np.unique(strata[np.isin(ids, chosen)], return_counts=True)
        per_class = {int(c): int(k) for c, k in zip(labels, counts, strict=True)}
    how = f"stratified by {stratify_by}" if stratify_by else "uniform"
    logger.info("sampling %d of %d gallery items (%s)", len(chosen), len(ids), how)
    quarantine_uri = storage.join(out_uri, "_quarantine")
    keep = [c for c in (ID, plan.content, LABEL) if c in names]
    ds = keep_only(read_gallery(gallery, rows_per_block=pool.batch_size).select_columns(keep), chosen)
    ds = prepare_rows(ds, plan.preprocessing, quarantine_uri=quarantine_uri, batch_size=pool.batch_size)
    ds = map_embed(ds, plan, pool)
    parts = []
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        finite = batch.pop("finite")
        if not finite.all():
            bad = batch[ID][~finite]
            write_quarantine(quarantine_uri, bad, ["non-finite embedding"] * len(bad), stage=Stage.EMBED)
        parts.append({k: v[finite] for k, v in batch.items()})
    versions = {column: read_spec(uri).version for column, uri in models.items()}
    table = _paired_table(parts, versions, side=SIDE in models, label=LABEL in names)
    if table.num_rows < 2:
        raise ValueError(f"{gallery.uri}: only {table.num_rows} of {len(chosen)} sampled items could be embedded")
    result = storage.write_table(table, out_uri)
    quarantined = len(np.unique(quarantined_ids(quarantine_uri, ENCODER_STAGES)))
    record = {
        "gallery": gallery.uri,
        "requested": int(n),
        "chosen": len(chosen),
        "rows": table.num_rows,
        "quarantined": quarantined,
        "stratify_by": stratify_by,
        "per_class": per_class,
        "seed": seed,
        "models": versions,
    }
    storage.write_bytes(storage.join(out_uri, SAMPLE_JSON), json.dumps(record, indent=2).encode())
    return SampleResult(result.uri, table.num_rows, len(chosen), quarantined, per_class)


def _paired_table(parts: list[dict[str, np.ndarray]], versions: dict[str, str], *, side: bool, label: bool) -> pa.Table:
    """The paired table in id order from the embedded batches."""

    def column(name: str) -> np.ndarray:
        return np.concatenate([p[name] for p in parts]) if parts else np.zeros(0)

    ids = column(ID).astype(np.int64)
    order = np.argsort(ids, kind="stable")
    columns: dict[str, pa.Array] = {ID: pa.array(ids[order])}
    for name in (OLD, NEW, *((SIDE,) if side else ())):
        vectors = np.concatenate([p[name] for p in parts]) if parts else np.zeros((0, 1), np.float32)
        columns[name] = fixed_size_list(vectors[order])
    if label:
        columns[LABEL] = pa.array(column(LABEL)[order].astype(np.int32))
    columns[OLD_MODEL] = pa.array([versions[OLD]] * len(ids), type=pa.string())
    columns[NEW_MODEL] = pa.array([versions[NEW]] * len(ids), type=pa.string())
    return pa.table(columns)
