"""Callable classes for ``Dataset.map_batches(..., compute=ActorPoolStrategy(...))``.

An encoder is loaded once per actor (not per batch), on the GPU when the actor was given one, with torch
threads matched to the actor's CPUs (oversubscribed threads on a 2-core box cost more than they give). Every
thread of an actor runs ``nice_increment`` nice steps below the worker's start (raybackfill.priority): the
actors are a backfill's background work, and the queries served from the same node go first.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import ray
import torch
from torch import nn

from raybackfill.data.schema import BAD_REASON, EMBEDDING, ID, SIDE_INFO, UNCERTAINTY, vectors_of
from raybackfill.encoders import EntrypointTrust, load_encoder
from raybackfill.logs import configure_logging
from raybackfill.models.artifacts import load_model
from raybackfill.models.transformations import apply_transformation
from raybackfill.priority import BackgroundPriority

logger = logging.getLogger(__name__)


def actor_device() -> torch.device:
    """CUDA only when this actor was given a GPU and torch sees one; otherwise the CPU."""
    if torch.cuda.is_available() and ray.is_initialized() and ray.get_gpu_ids():
        return torch.device("cuda")
    return torch.device("cpu")


class EmbedRows:
    """Prepared inputs -> one embedding column per encoder, in one pass over the rows.

    ``models`` maps an output column to an encoder artefact, e.g. ``{"embedding": old, "side_info": side}``, and
    ``inputs`` maps each output column to the prepared column it reads (raybackfill.data.loading.prepare_rows),
    so the old embedding and its side-information come from one decode. Rows whose ``bad_reason`` (when the
    stream carries one) is set get zero vectors without reaching the encoder. A ``finite`` column flags rows
    with NaN/inf outputs so the sink can quarantine them; other columns pass through.
    """

    def __init__(
        self,
        models: dict[str, str],
        inputs: dict[str, str],
        trust: EntrypointTrust | None = None,
        num_threads: int = 1,
        chunk: int = 256,
        nice_increment: int = 0,
    ) -> None:
        configure_logging()
        self.priority = BackgroundPriority(nice_increment)
        self.priority.apply()
        torch.set_num_threads(max(int(num_threads), 1))
        self.device = actor_device()
        self.encoders = {
            column: load_encoder(uri, trust=trust, device=self.device, chunk=chunk) for column, uri in models.items()
        }
        self.inputs = inputs
        logger.info(
            "embedding actor ready on %s (%d threads): %s",
            self.device,
            torch.get_num_threads(),
            ", ".join(f"{column} <- {uri}" for column, uri in models.items()),
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.priority.apply()  # threads torch or Ray started since the last batch
        prepared = set(self.inputs.values())
        out = {k: v for k, v in batch.items() if k not in prepared}
        rows = len(batch[ID])
        good = np.asarray(batch[BAD_REASON] == "", dtype=bool) if BAD_REASON in batch else np.ones(rows, dtype=bool)
        finite = np.ones(rows, dtype=bool)
        for column, encoder in self.encoders.items():
            values = batch[self.inputs[column]]
            vectors = encoder.embed(values if good.all() else values[good])
            if not good.all():
                full = np.zeros((rows, vectors.shape[1]), dtype=np.float32)
                full[good] = vectors
                vectors = full
            finite &= np.isfinite(vectors).all(axis=1)
            out[column] = vectors
        out["finite"] = finite
        return out


class TransformEmbeddings:
    """Stored old embeddings (+ side-info) -> new-space embeddings (+ uncertainty for FastFill).

    Works on Arrow batches so the fixed-size-list vectors are read zero-copy.
    """

    def __init__(self, model_uri: str, num_threads: int = 1, chunk: int = 256, nice_increment: int = 0) -> None:
        configure_logging()
        self.priority = BackgroundPriority(nice_increment)
        self.priority.apply()
        torch.set_num_threads(max(int(num_threads), 1))
        self.device = actor_device()
        self.model = load_model(model_uri).module.to(self.device).eval()
        self.chunk = chunk
        logger.info("transformation actor ready on %s: %s", self.device, model_uri)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        self.priority.apply()  # threads torch or Ray started since the last batch
        return transform_batch(self.model, batch, chunk=self.chunk, device=self.device)


def transform_batch(
    model: nn.Module, batch: pa.Table, *, chunk: int = 256, device: torch.device | str = "cpu"
) -> dict[str, np.ndarray]:
    """An embedding-table batch through a transformation (FCT / FastFill h, or psi): the one way a table is
    transformed, by the actors above (the backfill's instant phase) and in the driver (`raybackfill transform`).

    Returns ``id``, ``embedding`` (the transformed vectors), ``uncertainty`` for FastFill, ``finite`` (so the sink
    can quarantine non-finite rows) and every other column passed through; ``side_info`` is read only when the
    transformation was trained with it.
    """
    side = vectors_of(batch, SIDE_INFO) if getattr(model, "uses_side_info", False) else None
    vectors, uncertainty = apply_transformation(model, vectors_of(batch, EMBEDDING), side, chunk=chunk, device=device)
    out = {ID: batch.column(ID).to_numpy(), EMBEDDING: vectors, "finite": np.isfinite(vectors).all(axis=1)}
    if uncertainty is not None:
        out[UNCERTAINTY] = uncertainty
    for name in batch.schema.names:
        if name not in (ID, EMBEDDING, SIDE_INFO, UNCERTAINTY):
            out[name] = batch.column(name).to_numpy(zero_copy_only=False)
    return out
