"""The one place that knows the table schemas, and checks tables against them.

Errors name the file (or other source) and the column, because a user with a thousand shards needs to
know which one is wrong, not only that one is.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ID = "id"
IMAGE = "image"
TEXT = "text"
LABEL = "label"
EMBEDDING = "embedding"
SIDE_INFO = "side_info"
UNCERTAINTY = "uncertainty"
MODEL = "model"
GENERATION = "generation"  # an export's model version of the space its vectors are served in
LINEAGE = "lineage"  # an export's models each vector went through ("v1>v2": a v1 embedding transformed into v2)
BAD_REASON = "bad_reason"  # carried through a stream: why a row could not be prepared ("" when it could)

IMAGE_FIELDS = {ID: pa.int64(), IMAGE: pa.binary(), LABEL: pa.int32()}
TEXT_FIELDS = {ID: pa.int64(), TEXT: pa.string(), LABEL: pa.int32()}
GALLERY_COLUMNS = (IMAGE, TEXT)  # what a gallery row holds: encoded image bytes, or a text


class SchemaError(ValueError):
    """A table does not have the columns or types raybackfill needs."""


def _field_type(schema: pa.Schema, name: str, source: str) -> pa.DataType:
    if name not in schema.names:
        raise SchemaError(f"{source}: missing column '{name}' (columns: {', '.join(schema.names) or 'none'})")
    return schema.field(name).type


def check_unique_ids(ids: pa.Array | pa.ChunkedArray | np.ndarray, source: str) -> None:
    arr = np.asarray(ids)
    if len(arr) == 0:
        return
    uniq, counts = np.unique(arr, return_counts=True)
    dup = uniq[counts > 1]
    if len(dup):
        shown = ", ".join(str(int(x)) for x in dup[:5])
        more = f" and {len(dup) - 5} more" if len(dup) > 5 else ""
        raise SchemaError(f"{source}: column 'id' has duplicate ids: {shown}{more}")


def validate_gallery_schema(schema: pa.Schema, source: str, require_label: bool = False, column: str = IMAGE) -> None:
    """Check column names and types only (cheap: reads no data). ``column`` is the gallery's content column:
    ``image`` (encoded bytes) or ``text`` (strings)."""
    if column not in GALLERY_COLUMNS:
        raise ValueError(f"gallery column must be one of {GALLERY_COLUMNS}, got {column!r}")
    id_type = _field_type(schema, ID, source)
    if not pa.types.is_integer(id_type):
        raise SchemaError(f"{source}: column 'id' must be int64, found {id_type}")
    content_type = _field_type(schema, column, source)
    if column == IMAGE and not (pa.types.is_binary(content_type) or pa.types.is_large_binary(content_type)):
        raise SchemaError(f"{source}: column 'image' must be binary (encoded image bytes), found {content_type}")
    if column == TEXT and not (pa.types.is_string(content_type) or pa.types.is_large_string(content_type)):
        raise SchemaError(f"{source}: column 'text' must be string, found {content_type}")
    if LABEL in schema.names:
        label_type = schema.field(LABEL).type
        if not pa.types.is_integer(label_type):
            raise SchemaError(f"{source}: column 'label' must be int32, found {label_type}")
    elif require_label:
        raise SchemaError(f"{source}: missing column 'label' (needed for training and evaluation)")


def gallery_column(schema: pa.Schema, source: str) -> str:
    """The content column a gallery table has: ``image`` or ``text`` (a table with both is an image table)."""
    for column in GALLERY_COLUMNS:
        if column in schema.names:
            return column
    raise SchemaError(f"{source}: no 'image' or 'text' column (columns: {', '.join(schema.names) or 'none'})")


def validate_image_table(table: pa.Table, source: str, require_label: bool = False) -> pa.Table:
    """Validate an image table and return it with canonical types (id int64, label int32)."""
    validate_gallery_schema(table.schema, source, require_label)
    check_unique_ids(table.column(ID).to_numpy(), source)
    if table.column(ID).null_count:
        raise SchemaError(f"{source}: column 'id' has nulls")
    return _cast_columns(table, IMAGE_FIELDS)


def embedding_dim(schema: pa.Schema, column: str, source: str) -> int:
    col_type = _field_type(schema, column, source)
    if not pa.types.is_fixed_size_list(col_type) or not pa.types.is_floating(col_type.value_type):
        raise SchemaError(f"{source}: column '{column}' must be fixed_size_list<float32, d>, found {col_type}")
    return col_type.list_size


def validate_embedding_table(
    table: pa.Table, source: str, dim: int | None = None, require: tuple[str, ...] = ()
) -> pa.Table:
    """Validate an embedding table: ids unique, vectors of the expected dim, all finite."""
    id_type = _field_type(table.schema, ID, source)
    if not pa.types.is_integer(id_type):
        raise SchemaError(f"{source}: column 'id' must be int64, found {id_type}")
    for name in require:
        _field_type(table.schema, name, source)
    found = embedding_dim(table.schema, EMBEDDING, source)
    if dim is not None and found != dim:
        raise SchemaError(f"{source}: column 'embedding' has dim {found}, expected {dim}")
    check_unique_ids(table.column(ID).to_numpy(), source)
    for name in (EMBEDDING, SIDE_INFO):
        if name in table.schema.names:
            embedding_dim(table.schema, name, source)
            vectors = vectors_of(table, name)
            bad = ~np.isfinite(vectors).all(axis=1)
            if bad.any():
                ids = table.column(ID).to_numpy()[bad][:5].tolist()
                raise SchemaError(f"{source}: column '{name}' has NaN/inf in {int(bad.sum())} rows (ids {ids})")
    return table


def vectors_of(table: pa.Table, column: str = EMBEDDING) -> np.ndarray:
    """A fixed-size-list column as an (N, d) float32 array; zero-copy when the column has one chunk."""
    col = table.column(column)
    dim = col.type.list_size
    if col.num_chunks == 0:
        return np.zeros((0, dim), dtype=np.float32)
    arr = col.combine_chunks() if col.num_chunks > 1 else col.chunk(0)
    if arr.null_count:
        raise SchemaError(f"column '{column}' has {arr.null_count} null vectors")
    # flatten() honours the array's offset AND length (a slice from row 0 still shares the whole child).
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(arr), dim).astype(np.float32, copy=False)


def fixed_size_list(vectors: np.ndarray) -> pa.FixedSizeListArray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise SchemaError(f"vectors must be 2-D (N, d), got shape {vectors.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def embedding_table(
    ids: np.ndarray,
    embeddings: np.ndarray,
    *,
    side_info: np.ndarray | None = None,
    uncertainty: np.ndarray | None = None,
    model: str | None = None,
    extra: dict[str, np.ndarray | pa.Array] | None = None,
) -> pa.Table:
    """Build an embedding table from numpy arrays (the canonical constructor)."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) != len(embeddings):
        raise SchemaError(f"{len(ids)} ids for {len(embeddings)} embeddings")
    columns: dict[str, pa.Array] = {ID: pa.array(ids), EMBEDDING: fixed_size_list(embeddings)}
    if side_info is not None:
        columns[SIDE_INFO] = fixed_size_list(side_info)
    if uncertainty is not None:
        columns[UNCERTAINTY] = pa.array(np.asarray(uncertainty, dtype=np.float32))
    if model is not None:
        columns[MODEL] = pa.array([model] * len(ids), type=pa.string())
    for name, values in (extra or {}).items():
        columns[name] = values if isinstance(values, pa.Array) else pa.array(values)
    return pa.table(columns)


def image_table(ids, images: list[bytes], labels=None, extra: dict | None = None) -> pa.Table:
    return _gallery_table(ids, IMAGE, pa.array(images, type=pa.binary()), labels, extra)


def text_table(ids, texts: list[str], labels=None, extra: dict | None = None) -> pa.Table:
    return _gallery_table(ids, TEXT, pa.array(texts, type=pa.string()), labels, extra)


def _gallery_table(ids, column: str, content: pa.Array, labels, extra: dict | None) -> pa.Table:
    columns = {ID: pa.array(np.asarray(ids, dtype=np.int64)), column: content}
    if labels is not None:
        columns[LABEL] = pa.array(np.asarray(labels, dtype=np.int32))
    for name, values in (extra or {}).items():
        columns[name] = values if isinstance(values, pa.Array) else pa.array(values)
    return pa.table(columns)


QUARANTINE_SCHEMA = pa.schema([(ID, pa.int64()), ("reason", pa.string()), ("stage", pa.string())])


def quarantine_table(ids, reasons: list[str], stage: str) -> pa.Table:
    return pa.table(
        {
            ID: pa.array(np.asarray(ids, dtype=np.int64)),
            "reason": pa.array(reasons, type=pa.string()),
            "stage": pa.array([stage] * len(reasons), type=pa.string()),
        },
        schema=QUARANTINE_SCHEMA,
    )


def _cast_columns(table: pa.Table, types: dict[str, pa.DataType]) -> pa.Table:
    for name, typ in types.items():
        if name in table.schema.names and table.schema.field(name).type != typ:
            idx = table.schema.get_field_index(name)
            table = table.set_column(idx, name, pc.cast(table.column(name), typ))
    return table
