"""`raybackfill transform`: map an embedding table through a trained transformation (FCT / FastFill h, or psi).

It makes the ``--gallery-transformed`` and ``--psi-queries`` tables of `raybackfill eval run`. No Ray: a
transformation is a small MLP on stored vectors (no images to decode), so the driver maps the tables an
evaluation reads in seconds, less than starting a cluster and an actor pool would take. It runs the same batch
function as the backfill's instant phase (raybackfill.embed.actors.transform_batch), so the vectors are the
ones the backfill would serve.
"""

from __future__ import annotations

import argparse
from typing import cast

from raybackfill.data import storage
from raybackfill.data.schema import (
    EMBEDDING,
    ID,
    LABEL,
    SIDE_INFO,
    UNCERTAINTY,
    SchemaError,
    embedding_dim,
    embedding_table,
    validate_embedding_table,
)
from raybackfill.embed.actors import transform_batch
from raybackfill.models.artifacts import ArtifactError, load_model, read_spec
from raybackfill.types import Space

# The stored space each transformation reads: FCT / FastFill h the old embeddings, psi the new ones.
TRANSFORMATION_INPUTS = {
    "forward_transformation": Space.OLD,
    "fastfill_transformation": Space.OLD,
    "reverse_transformation": Space.NEW,
    "linear_forward": Space.OLD,  # closed-form adapters (raybackfill.adapters)
    "linear_reverse": Space.NEW,
}
DEFAULT_BATCH_SIZE = 8192  # rows per forward pass, as the backfill's instant phase


def register(subparsers: argparse._SubParsersAction) -> None:
    transform = subparsers.add_parser(
        "transform",
        help="map an embedding table through a trained transformation (FCT/FastFill h, or psi)",
        description="Read an embedding table (id, embedding; side_info when the transformation was trained "
        "with it), apply the transformation in batches in this process (no Ray) and write a new embedding "
        "table: id, embedding, model (the transformation's version), uncertainty (FastFill) and label (when "
        "the input has it). FCT / FastFill map old embeddings (-> --gallery-transformed of `eval run`), psi "
        "maps new ones (-> --psi-queries).",
    )
    transform.add_argument("--model", required=True, metavar="DIR", help="transformation artefact (h or psi)")
    transform.add_argument("--embeddings", required=True, metavar="URI", help="input embedding table (path or s3://)")
    transform.add_argument("--out", required=True, metavar="URI", help="output embedding table (a new URI)")
    transform.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"rows per forward pass (default {DEFAULT_BATCH_SIZE})",
    )
    transform.set_defaults(func=_transform)


def transform_table(
    embeddings_uri: str, model_uri: str, out_uri: str, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> storage.WriteResult:
    """Write ``model_uri`` applied to every row of ``embeddings_uri`` as a new table at ``out_uri``.

    The input is read and validated whole first, as `eval run` reads it (unique ids, the transformation's input
    dim, finite vectors, ``side_info`` when the transformation reads it), and so is the output: a table eval
    reads must hold every id, so a bad row is an error naming it, not a quarantined row, and nothing is written.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    spec = read_spec(model_uri)  # model.json only: a backbone is refused before its weights are read
    space = TRANSFORMATION_INPUTS.get(spec.architecture)
    if space is None:
        raise ArtifactError(
            f"{model_uri}: architecture {spec.architecture!r} is not a transformation "
            f"(one of {', '.join(TRANSFORMATION_INPUTS)})"
        )
    module = load_model(model_uri).module
    dims = cast(dict[str, int], module.dims)  # a transformation's property; torch types attributes Tensor | Module
    uses_side = bool(getattr(module, "uses_side_info", False))
    names = storage.read_footer(storage.table_shards(embeddings_uri)[0]).schema.to_arrow_schema().names
    # A shard without side_info fails here with the shard's path and the column's name.
    columns = [ID, EMBEDDING, *([SIDE_INFO] if uses_side else []), *([LABEL] if LABEL in names else [])]
    table = storage.read_table(embeddings_uri, columns)
    table = validate_embedding_table(table, embeddings_uri, dim=dims[space])
    if uses_side and (found := embedding_dim(table.schema, SIDE_INFO, embeddings_uri)) != dims["side"]:
        raise SchemaError(f"{embeddings_uri}: column '{SIDE_INFO}' has dim {found}, expected {dims['side']}")
    out = transform_batch(module, table, chunk=batch_size)
    result = embedding_table(
        out[ID],
        out[EMBEDDING],
        uncertainty=out.get(UNCERTAINTY),
        model=spec.version,
        extra={LABEL: out[LABEL]} if LABEL in out else None,
    )
    validate_embedding_table(result, f"{model_uri} applied to {embeddings_uri}")
    return storage.write_table(result, out_uri)


def _transform(args: argparse.Namespace) -> None:
    result = transform_table(args.embeddings, args.model, args.out, batch_size=args.batch_size)
    print(f"wrote {result.rows} transformed embeddings to {result.uri} ({len(result.shards)} shards)")
