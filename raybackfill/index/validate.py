"""Input checks shared by the shard and the router (pure numpy).

The index is a long-lived service: a bad batch or query must be refused with a message that says what
is wrong (and which ids), never crash the actor or leave half a batch applied.
"""

from __future__ import annotations

import numpy as np

from raybackfill.index.merge import EMPTY_ID


def show_ids(values: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def as_ids(ids, what: str = "ids") -> np.ndarray:
    """A 1-D int64 array of unique, non-negative ids (-1 marks empty result slots, so it is reserved)."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must be integers (int64), got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    negative = arr[arr <= EMPTY_ID]
    if len(negative):
        raise ValueError(f"{what} must be non-negative (-1 marks empty result slots): {show_ids(negative)}")
    uniq, counts = np.unique(arr, return_counts=True)
    dup = uniq[counts > 1]
    if len(dup):
        raise ValueError(f"{what} has duplicate ids within one batch: {show_ids(dup)}")
    return arr


def as_vectors(vectors, dim: int | None, what: str = "vectors", ids: np.ndarray | None = None) -> np.ndarray:
    """A C-contiguous (n, d) float32 array with finite values (float64 and other reals are cast)."""
    arr = np.asarray(vectors)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (n, d) array, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{what} must be real numbers (float32), got dtype {arr.dtype}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{what} have dim {arr.shape[1]}, expected {dim}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        where = f" (ids {show_ids(ids[bad])})" if ids is not None else f" (rows {show_ids(np.flatnonzero(bad))})"
        raise ValueError(f"{what} have NaN/inf in {int(bad.sum())} rows{where}")
    return arr


def unit_rows(vectors: np.ndarray, what: str = "vectors", ids: np.ndarray | None = None) -> np.ndarray:
    """Rows scaled to unit L2 norm, for the cosine metric; a zero row has no direction and is refused."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    if zero.any():
        where = f"ids {show_ids(ids[zero])}" if ids is not None else f"rows {show_ids(np.flatnonzero(zero))}"
        raise ValueError(f"{what}: zero vector(s) at {where} have no cosine similarity")
    return vectors / norms


def as_batch(ids, vectors, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate an (ids, vectors) batch as a whole: lengths agree, ids unique, vectors finite."""
    ids = as_ids(ids)
    if len(np.asarray(vectors)) != len(ids):
        raise ValueError(f"{len(ids)} ids for {len(np.asarray(vectors))} vectors")
    return ids, as_vectors(vectors, dim, ids=ids)


def as_queries(queries, dim: int | None, max_queries: int, what: str) -> np.ndarray:
    """A non-empty (nq, d) float32 query batch; a single (d,) vector is one query."""
    arr = np.asarray(queries)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim == 2 and arr.shape[0] == 0:
        raise ValueError(f"{what} is empty: send at least one query")
    if arr.ndim == 2 and arr.shape[0] > max_queries:
        raise ValueError(
            f"{what} has {arr.shape[0]} queries, more than the limit of {max_queries} per call; split the batch"
        )
    return as_vectors(arr, dim, what)


def check_k(k, max_k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer, got {k!r}")
    if not 0 < k <= max_k:
        raise ValueError(f"k must be between 1 and {max_k}, got {k}")
    return int(k)
