"""Whole-input checks a backfill makes before it writes anything.

Why up front: an input that is invalid as a whole (a gallery shard without its image column, an empty or
unreadable file, old embeddings of two dims, an id twice, a broken or truncated model artefact) would otherwise
surface minutes later inside a Ray Data worker, as a traceback that may not name the file, after the plan
was partly built. These checks read only Parquet footers, id columns and model files. Per-row problems (a corrupt
image, a NaN vector) are not checked here: the job quarantines those rows and finishes the others.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from raybackfill.data import storage
from raybackfill.data.loading import gallery_shards
from raybackfill.data.schema import (
    EMBEDDING,
    ID,
    SIDE_INFO,
    SchemaError,
    check_unique_ids,
    embedding_dim,
)
from raybackfill.data.storage import TableFiles
from raybackfill.encoders import EntrypointTrust, load_encoder
from raybackfill.models.artifacts import load_model


def old_embedding_dim(table: str | TableFiles) -> int:
    """The dim of a stored embedding table, checked on every shard's footer (one dim for the whole table)."""
    table = storage.open_table(table)
    shards = table.shards
    dims = {}
    for shard, schema in table.shard_schemas():
        if ID not in schema.names or not pa.types.is_integer(schema.field(ID).type):
            raise SchemaError(f"{shard}: needs an integer column 'id' (columns: {', '.join(schema.names)})")
        dims[shard] = embedding_dim(schema, EMBEDDING, shard)
    first = dims[shards[0]]
    for shard, dim in dims.items():
        if dim != first:
            raise SchemaError(f"{shard}: column 'embedding' has dim {dim}, but {shards[0]} has dim {first}")
    return first


def _ids(table: TableFiles) -> np.ndarray:
    """The id column of every shard of a table (nothing else is read)."""
    fs, _ = storage.resolve(table.uri)
    paths = [storage.resolve(shard)[1] for shard in table.shards]
    try:
        return pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=[ID]).column(ID).to_numpy()
    except (OSError, pa.ArrowInvalid) as err:
        raise storage.StorageError(f"{table.uri}: cannot read the id column ({err})") from err


def check_inputs(
    gallery: str | TableFiles,
    old_embeddings: str | TableFiles,
    upgrade: str,
    transformation: str | None = None,
    *,
    old_model: str | None = None,
    trust: EntrypointTrust | None = None,
) -> tuple[TableFiles, TableFiles]:
    """Raise (naming the file) if the gallery, the old embeddings or a model cannot be used at all.

    ``upgrade`` is the new encoder (any kind; an untrusted entrypoint is refused before it is imported);
    ``old_model`` the old backbone whose classifier some policies read (a model raybackfill trained).
    Returns the gallery and old-embedding tables as resolved for the checks, for the steps that read them next."""
    gallery = storage.open_table(gallery)
    gallery_shards(gallery)  # every shard's footer has the gallery's columns and types
    old_embeddings = storage.open_table(old_embeddings)
    dim = old_embedding_dim(old_embeddings)
    for table in (gallery, old_embeddings):
        check_unique_ids(_ids(table), table.uri)
    load_encoder(upgrade, trust=trust)  # model.json and its file: a truncated file fails here, not in a worker
    if old_model:
        load_model(old_model)
    if transformation:
        loaded = load_model(transformation)
        wants = loaded.spec.dims.get("old")
        if wants is not None and wants != dim:
            raise SchemaError(
                f"{old_embeddings.uri}: old embeddings have dim {dim}, but the transformation "
                f"{transformation} maps dim {wants}"
            )
        if getattr(loaded.module, "uses_side_info", False):
            _check_side_info(old_embeddings, loaded.spec.dims["side"], transformation)
    return gallery, old_embeddings


def _check_side_info(old_embeddings: TableFiles, dim: int, transformation: str) -> None:
    """A transformation trained with side-information reads it from every old-embedding shard."""
    for shard, schema in old_embeddings.shard_schemas():
        if SIDE_INFO not in schema.names:
            raise SchemaError(
                f"{shard}: missing column '{SIDE_INFO}', which the transformation {transformation} "
                f"reads (embed the old gallery with --side-info-model)"
            )
        if (found := embedding_dim(schema, SIDE_INFO, shard)) != dim:
            raise SchemaError(
                f"{shard}: column '{SIDE_INFO}' has dim {found}, but the transformation "
                f"{transformation} reads dim {dim}"
            )
