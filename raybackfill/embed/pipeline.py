"""Embedding jobs: image table -> embedding table, and old embeddings -> transformed embeddings.

Both stream with Ray Data through an actor pool that loads the model once per actor. The driver is the
sink: it writes finished rows as shards and quarantines rows with non-finite outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
from tqdm import tqdm

from raybackfill.data import io
from raybackfill.data.loading import decode_images, probe_image_size, read_images, read_shards, write_quarantine
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
from raybackfill.embed.actors import EmbedImages, TransformEmbeddings
from raybackfill.models.artifacts import read_spec


@dataclass
class PoolConfig:
    """Actor pool sizing. On 2 CPUs an actor must take well under 1 CPU or the read tasks starve."""

    actors: int = 1
    cpus_per_actor: float = 0.5
    gpus_per_actor: float | None = None  # None: one GPU per actor when the cluster has GPUs
    batch_size: int = 256
    rows_per_shard: int = 50_000

    def gpus(self) -> float:
        if self.gpus_per_actor is not None:
            return self.gpus_per_actor
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


@dataclass(frozen=True)
class EmbedResult:
    uri: str
    rows: int
    quarantined: int


def map_embed(ds: ray.data.Dataset, models: dict[str, str], pool: PoolConfig) -> ray.data.Dataset:
    """Add the embedding stage: decoded ``pixels`` -> one column per model."""
    return _actor_stage(ds, EmbedImages, {"models": models}, pool, "numpy")


def map_transform(ds: ray.data.Dataset, model_uri: str, pool: PoolConfig) -> ray.data.Dataset:
    """Add the forward-transformation stage: stored old embeddings (+ side-info) -> new-space embeddings
    (+ uncertainty). Arrow batches, so the fixed-size-list vectors reach the actor without a copy."""
    return _actor_stage(ds, TransformEmbeddings, {"model_uri": model_uri}, pool, "pyarrow")


def _actor_stage(
    ds: ray.data.Dataset, actor: type, kwargs: dict, pool: PoolConfig, batch_format: str
) -> ray.data.Dataset:
    """An actor pool that loads its models once per actor (not once per batch), with torch threads matched
    to the actor's CPUs."""
    return ds.map_batches(
        actor,
        fn_constructor_kwargs={**kwargs, "num_threads": max(int(pool.cpus_per_actor), 1)},
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        batch_size=pool.batch_size,
        batch_format=batch_format,
        num_cpus=pool.cpus_per_actor,
        num_gpus=pool.gpus(),
    )


def embed_images(
    images_uri: str,
    models: dict[str, str],
    out_uri: str,
    *,
    pool: PoolConfig | None = None,
    quarantine_uri: str | None = None,
    keep_columns: tuple[str, ...] = ("label",),
    progress: bool = True,
) -> EmbedResult:
    """Embed every image with each model in ``models`` (output column -> artefact URI)."""
    pool = pool or PoolConfig()
    if EMBEDDING not in models:
        raise ValueError(f"models must include the '{EMBEDDING}' column, got {sorted(models)}")
    version = read_spec(models[EMBEDDING]).version
    quarantine_uri = quarantine_uri or io.join(out_uri, "_quarantine")
    ds = read_images(images_uri, rows_per_block=pool.batch_size)  # one actor task per batch
    columns = [c for c in (ID, "image", *keep_columns) if c in ds.schema().names]
    ds = decode_images(ds.select_columns(columns), size=probe_image_size(images_uri), quarantine_uri=quarantine_uri)
    ds = map_embed(ds, models, pool)
    return _write_embeddings(ds, out_uri, version, quarantine_uri, pool, progress, f"embed {images_uri}")


def transform_embeddings(
    old_uri: str, model_uri: str, out_uri: str, *, pool: PoolConfig | None = None, progress: bool = True
) -> EmbedResult:
    """Apply a forward transformation to a stored old-embedding table (no images read)."""
    pool = pool or PoolConfig(batch_size=8192)
    spec = read_spec(model_uri)
    ds = map_transform(read_shards(io.list_shards(old_uri), rows_per_block=pool.batch_size), model_uri, pool)
    quarantine_uri = io.join(out_uri, "_quarantine")
    return _write_embeddings(ds, out_uri, spec.version, quarantine_uri, pool, progress, f"transform {old_uri}")


def _write_embeddings(
    ds: ray.data.Dataset,
    out_uri: str,
    version: str,
    quarantine_uri: str,
    pool: PoolConfig,
    progress: bool,
    label: str,
) -> EmbedResult:
    if io.next_shard_index(out_uri):
        raise io.ShardExistsError(f"{out_uri}: already holds an embedding table; use a new URI")
    pending: list[pa.Table] = []
    buffered = rows = quarantined = shard = 0
    bar = tqdm(desc=label, unit="item", disable=not progress)

    def flush() -> None:
        nonlocal pending, buffered, shard
        if pending:
            io.write_shard(pa.concat_tables(pending), out_uri, io.shard_name(shard))
            shard += 1
            pending, buffered = [], 0

    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        finite = batch.pop("finite")
        if not finite.all():
            bad = batch[ID][~finite]
            write_quarantine(quarantine_uri, bad, ["non-finite embedding"] * len(bad), stage="embed")
            quarantined += len(bad)
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
    if rows == 0:
        raise ValueError(f"{label}: no rows were embedded (all {quarantined} quarantined or empty input)")
    return EmbedResult(out_uri, rows, quarantined)


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
