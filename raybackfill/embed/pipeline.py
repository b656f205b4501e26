"""Embedding jobs: gallery table (images or texts) -> embedding table, and old embeddings -> transformed embeddings.

Both stream with Ray Data through an actor pool that loads the model once per actor. The driver is the
sink: it writes finished rows as shards and quarantines rows with non-finite outputs.

Resumable like the backfill (raybackfill.backfill.ledger), with the same skip lists from the data layer:
``OUT/_manifest.json`` names the models' versions before the first shard is written. A re-run with the same
models skips the ids of the committed shards and of the quarantine, and writes its shards after the committed
ones (which stay as they are); the manifest is marked complete, with the counts, once every input row is in a
shard or quarantined. A re-run of a complete table does nothing; a table made by other models is refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace

import numpy as np
import pyarrow as pa
import ray
from tqdm import tqdm

from raybackfill.data import storage
from raybackfill.data.loading import (
    gallery_content,
    keep_only,
    prepare_rows,
    quarantined_ids,
    read_gallery,
    read_shards,
    resolve_preprocessing,
    write_quarantine,
)
from raybackfill.data.preprocessing import Preprocessing
from raybackfill.data.schema import (
    EMBEDDING,
    ID,
    MODEL,
    SIDE_INFO,
    UNCERTAINTY,
    embedding_table,
    fixed_size_list,
    validate_embedding_table,
)
from raybackfill.data.storage import TableFiles
from raybackfill.embed.actors import EmbedRows, TransformEmbeddings
from raybackfill.encoders import EntrypointTrust, check_trusted, encoder_preprocessing
from raybackfill.models.artifacts import MODEL_JSON, read_spec
from raybackfill.priority import check_nice_increment
from raybackfill.types import ENCODER_STAGES, Stage

logger = logging.getLogger(__name__)

MANIFEST = "_manifest.json"


@dataclass
class PoolConfig:
    """Actor pool sizing. On 2 CPUs an actor must take well under 1 CPU or the read tasks starve."""

    actors: int = 1
    cpus_per_actor: float = 0.5
    # None: one GPU per actor when the cluster has GPUs at the start. An autoscaling cluster whose GPU nodes
    # scale from zero has none then: a number is requested as is, and the request makes the autoscaler add them.
    gpus_per_actor: float | None = None
    batch_size: int = 256
    rows_per_shard: int = 50_000  # the embed jobs' shard size: also the most work a kill loses
    # Nice steps (Linux) the actors run below the Ray worker they start as: on a node that also serves queries,
    # the scheduler gives the queries the cores first (raybackfill.priority). 0 treats both alike.
    nice_increment: int = 4

    def __post_init__(self) -> None:
        """Refuse sizes that Ray would reject deep inside a job (or wait on for ever: no actors)."""
        for name in ("actors", "batch_size", "rows_per_shard"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("cpus_per_actor", "gpus_per_actor"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        check_nice_increment(self.nice_increment, "nice_increment")

    def gpus(self) -> float:
        """GPUs each actor requests: ``gpus_per_actor``, else 1 if the cluster has a GPU now."""
        if self.gpus_per_actor is not None:
            return self.gpus_per_actor
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


@dataclass(frozen=True)
class EmbedResult:
    uri: str
    rows: int  # in the table, this run's and earlier runs'
    quarantined: int  # likewise
    written: int  # rows this run wrote
    already_complete: bool = False  # the table was complete before this run: nothing was done


@dataclass(frozen=True)
class Manifest:
    """``OUT/_manifest.json``: the models that make the table, and whether (and with what) it is complete."""

    models: dict[str, str]  # output column -> model version
    complete: bool = False
    rows: int = 0
    quarantined: int = 0


@dataclass(frozen=True)
class EncoderInputs:
    """How one Ray Data pass feeds its encoders: the gallery column they read, the prepared columns and the
    preprocessing making each, and which prepared column each encoder embeds. Encoders that prepare rows the
    same way share one prepared column (one decode for the old model and its side-information model)."""

    models: dict[str, str]  # output column -> encoder artefact
    content: str  # gallery column read: "image" or "text"
    preprocessing: dict[str, Preprocessing]  # prepared column -> how it is made
    inputs: dict[str, str]  # output column -> prepared column
    trust: EntrypointTrust = EntrypointTrust()


def plan_inputs(
    models: dict[str, str], gallery: str | TableFiles, trust: EntrypointTrust | None = None
) -> EncoderInputs:
    """Read each encoder's model.json, refuse untrusted entrypoints and encoders of another modality than the
    gallery, and fill sizes left open from the gallery: all in the driver, before any job starts."""
    trust = trust or EntrypointTrust()
    gallery = storage.open_table(gallery)
    content = gallery_content(gallery)
    preprocessing: dict[str, Preprocessing] = {}
    inputs: dict[str, str] = {}
    for column, uri in models.items():
        spec = read_spec(uri)
        source = storage.join(uri, MODEL_JSON)
        check_trusted(spec, trust, source)
        wanted = resolve_preprocessing(encoder_preprocessing(spec, source), gallery)
        if wanted.modality.column != content:
            article = "an" if wanted.modality.value[0] in "aeiou" else "a"
            raise ValueError(
                f"{source}: {article} {wanted.modality.value} encoder cannot embed {gallery.uri}, "
                f"whose rows hold '{content}'"
            )
        name = next((k for k, p in preprocessing.items() if p == wanted), f"prepared_{len(preprocessing)}")
        preprocessing[name] = wanted
        inputs[column] = name
    return EncoderInputs(dict(models), content, preprocessing, inputs, trust)


def map_embed(ds: ray.data.Dataset, plan: EncoderInputs, pool: PoolConfig) -> ray.data.Dataset:
    """Add the embedding stage: the prepared columns of ``plan`` -> one column per encoder."""
    return _actor_stage(
        ds, EmbedRows, {"models": plan.models, "inputs": plan.inputs, "trust": plan.trust}, pool, "numpy"
    )


def map_transform(ds: ray.data.Dataset, model_uri: str, pool: PoolConfig) -> ray.data.Dataset:
    """Add the forward-transformation stage: stored old embeddings (+ side-info) -> new-space embeddings
    (+ uncertainty). Arrow batches, so the fixed-size-list vectors reach the actor without a copy."""
    return _actor_stage(ds, TransformEmbeddings, {"model_uri": model_uri}, pool, "pyarrow")


def _actor_stage(
    ds: ray.data.Dataset, actor: type, kwargs: dict, pool: PoolConfig, batch_format: str
) -> ray.data.Dataset:
    """An actor pool that loads its models once per actor (not once per batch), with torch threads matched
    to the actor's CPUs and ``pool.nice_increment`` nice steps below the queries."""
    return ds.map_batches(
        actor,
        fn_constructor_kwargs={
            **kwargs,
            "num_threads": max(int(pool.cpus_per_actor), 1),
            "nice_increment": pool.nice_increment,
        },
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        batch_size=pool.batch_size,
        batch_format=batch_format,
        num_cpus=pool.cpus_per_actor,
        num_gpus=pool.gpus(),
    )


def embed_gallery(
    gallery_uri: str,
    models: dict[str, str],
    out_uri: str,
    *,
    pool: PoolConfig | None = None,
    quarantine_uri: str | None = None,
    keep_columns: tuple[str, ...] = ("label",),
    progress: bool = True,
    trust: EntrypointTrust | None = None,
) -> EmbedResult:
    """Embed every row of a gallery (images or texts) with each encoder in ``models``; continue a table that a
    killed run of the same encoders left partial.

    Args:
        gallery_uri: the gallery table (``id`` + ``image`` or ``text``), local or s3://.
        models: output column -> encoder artefact; must include ``embedding`` (e.g. also ``side_info``).
        out_uri: where the embedding table is written.
        pool: the embedding actors' sizing.
        quarantine_uri: where rows that cannot be prepared or embed to NaN go (default ``OUT/_quarantine``).
        keep_columns: gallery columns copied to the output when present.
        progress: show a progress bar.
        trust: the entrypoints the user trusts (an untrusted one is refused before anything runs).

    Returns:
        The table's row and quarantine counts.

    Examples:
        >>> embed_gallery("gallery/", {"embedding": "models/v1"}, "emb/v1")  # doctest: +SKIP
    """
    pool = pool or PoolConfig()
    if EMBEDDING not in models:
        raise ValueError(f"models must include the '{EMBEDDING}' column, got {sorted(models)}")
    gallery = storage.open_table(gallery_uri)  # shards listed and footers read once for every step below
    plan = plan_inputs(models, gallery, trust)  # before the manifest: a refused encoder writes nothing
    manifest = _open_table(out_uri, {column: read_spec(uri).version for column, uri in models.items()})
    if manifest.complete:
        logger.info("%s is complete (%d rows): nothing to embed", out_uri, manifest.rows)
        return EmbedResult(out_uri, manifest.rows, manifest.quarantined, 0, already_complete=True)
    quarantine_uri = quarantine_uri or storage.join(out_uri, "_quarantine")
    ds: ray.data.Dataset | None  # None when no row is left to do (_skip_done)
    ds = read_gallery(gallery, rows_per_block=pool.batch_size)  # one actor task per batch
    columns = [c for c in (ID, plan.content, *keep_columns) if c in ds.schema().names]
    ds = _skip_done(ds.select_columns(columns), gallery, out_uri, quarantine_uri)
    if ds is not None:
        # Prepared in batches of the pool's size too: at the default 256 a small-batch run reached the sink
        # as a few large blocks, so its shards (and the work a kill can lose) were far above rows_per_shard.
        ds = prepare_rows(ds, plan.preprocessing, quarantine_uri=quarantine_uri, batch_size=pool.batch_size)
        ds = map_embed(ds, plan, pool)
    return _write_embeddings(ds, out_uri, manifest, quarantine_uri, pool, progress, f"embed {gallery_uri}")


def transform_embeddings(
    old_uri: str, model_uri: str, out_uri: str, *, pool: PoolConfig | None = None, progress: bool = True
) -> EmbedResult:
    """Apply a forward transformation to a stored old-embedding table (no images read); resumable likewise."""
    pool = pool or PoolConfig(batch_size=8192)
    manifest = _open_table(out_uri, {EMBEDDING: read_spec(model_uri).version})
    if manifest.complete:
        return EmbedResult(out_uri, manifest.rows, manifest.quarantined, 0, already_complete=True)
    quarantine_uri = storage.join(out_uri, "_quarantine")
    ds: ray.data.Dataset | None  # None when no row is left to do (_skip_done)
    old = storage.open_table(old_uri)  # listed once, for the read and the resume filter
    ds = read_shards(old, rows_per_block=pool.batch_size)
    ds = _skip_done(ds, old, out_uri, quarantine_uri)
    if ds is not None:
        ds = map_transform(ds, model_uri, pool)
    return _write_embeddings(ds, out_uri, manifest, quarantine_uri, pool, progress, f"transform {old_uri}")


def read_manifest(out_uri: str) -> Manifest | None:
    """The table's manifest, or None when it has none (a new table)."""
    uri = storage.join(out_uri, MANIFEST)
    return Manifest(**json.loads(storage.read_bytes(uri))) if storage.exists(uri) else None


def _write_manifest(out_uri: str, manifest: Manifest, *, if_exists: str = "replace") -> None:
    """Write the manifest in one atomic step (``raybackfill.data.storage.write_bytes``)."""
    storage.write_bytes(storage.join(out_uri, MANIFEST), json.dumps(asdict(manifest)).encode(), if_exists=if_exists)


def _open_table(out_uri: str, models: dict[str, str]) -> Manifest:
    """The manifest of the table that ``models`` (output column -> version) write at ``out_uri``. A new table
    gets one before its first shard, so that a partial table says what made it; other models' table is refused."""
    manifest = read_manifest(out_uri)
    if manifest is None:
        if storage.exists(out_uri) and storage.list_shards(out_uri):
            raise storage.ShardExistsError(
                f"{out_uri}: holds shards but no {MANIFEST} (not an embed job's); use a new URI"
            )
        manifest = Manifest(models)
        _write_manifest(out_uri, manifest, if_exists="error")  # two runs starting at once: one fails
    if manifest.models != models:
        raise ValueError(
            f"{out_uri}: holds embeddings by models {manifest.models}, not {models}; "
            "use a new URI, or the same models to continue it"
        )
    return manifest


def _skip_done(ds: ray.data.Dataset, table: TableFiles, out_uri: str, quarantine_uri: str) -> ray.data.Dataset | None:
    """``ds`` (rows of ``table``) without the ids an earlier run committed to ``out_uri`` or quarantined;
    None when no row is left. A first run skips the filter pass."""
    done = np.union1d(storage.committed_ids(out_uri, recursive=False), quarantined_ids(quarantine_uri, ENCODER_STAGES))
    if not len(done):
        return ds
    keep = np.setdiff1d(table.read([ID]).column(ID).to_numpy(), done)
    logger.info("continuing %s: %d rows already done or quarantined, %d left", out_uri, len(done), len(keep))
    if not len(keep):
        return None
    return keep_only(ds, keep)


def _write_embeddings(
    ds: ray.data.Dataset | None,
    out_uri: str,
    manifest: Manifest,
    quarantine_uri: str,
    pool: PoolConfig,
    progress: bool,
    label: str,
) -> EmbedResult:
    """Write ``ds`` (None: nothing left) as shards after the committed ones, then mark the table complete."""
    version = manifest.models[EMBEDDING]
    pending: list[pa.Table] = []
    buffered = rows = 0
    shard = storage.next_shard_index(out_uri)
    bar = tqdm(desc=label, unit="item", disable=not progress)

    def flush() -> None:
        nonlocal pending, buffered, shard
        if pending:
            storage.write_shard(pa.concat_tables(pending), out_uri, storage.shard_name(shard))
            shard += 1
            pending, buffered = [], 0

    for batch in ds.iter_batches(batch_format="numpy", batch_size=None) if ds is not None else ():
        finite = batch.pop("finite")
        if not finite.all():
            bad = batch[ID][~finite]
            write_quarantine(quarantine_uri, bad, ["non-finite embedding"] * len(bad), stage=Stage.EMBED)
            batch = {k: v[finite] for k, v in batch.items()}
        table = _to_table(batch, version)
        pending.append(table)
        buffered += table.num_rows
        rows += table.num_rows
        bar.update(table.num_rows)
        if buffered >= pool.rows_per_shard:
            flush()
    flush()
    bar.close()
    total = sum(storage.read_footer(uri).num_rows for uri in storage.list_shards(out_uri))
    quarantined = len(np.unique(quarantined_ids(quarantine_uri, ENCODER_STAGES)))
    if total == 0:
        raise ValueError(f"{label}: no rows were embedded (all {quarantined} quarantined or empty input)")
    _write_manifest(out_uri, replace(manifest, complete=True, rows=total, quarantined=quarantined))
    logger.info("%s: %d rows written by this run, %d in the table, %d quarantined", label, rows, total, quarantined)
    return EmbedResult(out_uri, total, quarantined, rows)


def _to_table(batch: dict[str, np.ndarray], version: str) -> pa.Table:
    vectors = {k: v for k, v in batch.items() if isinstance(v, np.ndarray) and v.ndim == 2}
    extra = {k: v for k, v in batch.items() if k not in vectors and k not in (ID, UNCERTAINTY, MODEL)}
    embeddings, side_info = vectors.pop(EMBEDDING), vectors.pop(SIDE_INFO, None)
    # Any further model columns (embed_images with more models) are kept as vector columns, not dropped.
    extra |= {k: fixed_size_list(v) for k, v in vectors.items()}
    table = embedding_table(
        batch[ID], embeddings, side_info=side_info, uncertainty=batch.get(UNCERTAINTY), model=version, extra=extra
    )
    return validate_embedding_table(table, "embedding batch")
