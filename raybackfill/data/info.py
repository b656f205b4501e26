"""What a stored table holds (rows, shards, columns, classes, embedding dim), read as cheaply as possible.

Class names travel in the Parquet schema metadata, so a table imported from an ImageFolder or CIFAR
still says which label is "cat" after it has been split, sharded or copied to S3.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raybackfill.data.schema import EMBEDDING, LABEL, embedding_dim
from raybackfill.data.storage import read_footer, read_table, table_shards

CLASS_NAMES_KEY = b"raybackfill.class_names"


def with_class_names(table: pa.Table, names: list[str]) -> pa.Table:
    """The table with ``names[label]`` recorded in its schema metadata (kept by Parquet)."""
    metadata = dict(table.schema.metadata or {})
    metadata[CLASS_NAMES_KEY] = json.dumps(list(names)).encode()
    return table.replace_schema_metadata(metadata)


def class_names(schema: pa.Schema) -> list[str] | None:
    """The class names stored by ``with_class_names``, or None when the table has none."""
    raw = (schema.metadata or {}).get(CLASS_NAMES_KEY)
    return None if raw is None else json.loads(raw)


@dataclass(frozen=True)
class TableInfo:
    uri: str
    rows: int
    shards: int
    columns: dict[str, str]  # name -> Arrow type
    classes: int | None  # distinct labels, when there is a label column
    class_names: list[str] | None
    embedding_dim: int | None


def table_info(uri: str) -> TableInfo:
    """Describe a table from its Parquet footers; only the label column is read, and only if present."""
    shards = table_shards(uri)
    rows = 0
    schema = None
    for shard in shards:
        meta = read_footer(shard)
        rows += meta.num_rows
        schema = schema or meta.schema.to_arrow_schema()
    assert schema is not None  # table_shards refuses a table without shards
    classes = None
    if LABEL in schema.names:
        labels = read_table(uri, columns=[LABEL]).column(LABEL).drop_null().to_numpy()
        classes = len(np.unique(labels))
    dim = embedding_dim(schema, EMBEDDING, uri) if EMBEDDING in schema.names else None
    return TableInfo(
        uri=uri,
        rows=rows,
        shards=len(shards),
        columns={field.name: str(field.type) for field in schema},
        classes=classes,
        class_names=class_names(schema),
        embedding_dim=dim,
    )
