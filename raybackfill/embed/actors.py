"""Callable classes for ``Dataset.map_batches(..., compute=ActorPoolStrategy(...))``.

A model is loaded once per actor (not per batch), on the GPU when the actor was given one, with torch
threads matched to the actor's CPUs (oversubscribed threads on a 2-core box cost more than they give).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray
import torch
from torch import nn

from raybackfill.data.schema import EMBEDDING, ID, SIDE_INFO, UNCERTAINTY, vectors_of
from raybackfill.models.artifacts import load_model
from raybackfill.models.transformations import apply_transformation


def actor_device() -> torch.device:
    """CUDA only when this actor was given a GPU and torch sees one; otherwise the CPU."""
    if torch.cuda.is_available() and ray.is_initialized() and ray.get_gpu_ids():
        return torch.device("cuda")
    return torch.device("cpu")


class EmbedImages:
    """``pixels`` (N, 3, H, W) -> one embedding column per model, in one pass over the images.

    ``models`` maps an output column to a model artefact, e.g. ``{"embedding": old, "side_info": side}``
    so the old embedding and its side-information are computed from one decode. A ``finite`` column
    flags rows with NaN/inf outputs so the sink can quarantine them; other columns pass through.
    """

    def __init__(self, models: dict[str, str], num_threads: int = 1, chunk: int = 256) -> None:
        torch.set_num_threads(max(int(num_threads), 1))
        self.device = actor_device()
        self.models = {column: load_model(uri).module.to(self.device).eval() for column, uri in models.items()}
        self.chunk = chunk

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"], dtype=np.float32))
        out = {k: v for k, v in batch.items() if k != "pixels"}
        finite = np.ones(len(pixels), dtype=bool)
        with torch.inference_mode():
            for column, model in self.models.items():
                parts = [
                    model.embed(pixels[start : start + self.chunk].to(self.device)).float().cpu()
                    for start in range(0, len(pixels), self.chunk)
                ]
                vectors = torch.cat(parts).numpy() if parts else np.zeros((0, model.embedding_dim), np.float32)
                finite &= np.isfinite(vectors).all(axis=1)
                out[column] = vectors
        out["finite"] = finite
        return out


class TransformEmbeddings:
    """Stored old embeddings (+ side-info) -> new-space embeddings (+ uncertainty for FastFill).

    Works on Arrow batches so the fixed-size-list vectors are read zero-copy.
    """

    def __init__(self, model_uri: str, num_threads: int = 1, chunk: int = 256) -> None:
        torch.set_num_threads(max(int(num_threads), 1))
        self.device = actor_device()
        self.model = load_model(model_uri).module.to(self.device).eval()
        self.chunk = chunk

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
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
