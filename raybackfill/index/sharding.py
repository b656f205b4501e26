"""Which shard owns an id (pure numpy, vectorised).

Ids are often sequential or clustered (id order = upload order = backfill priority tiers), so plain
``id % S`` would give each shard a biased slice of every batch. The SplitMix64 finaliser mixes the
bits first; it is stable across processes and versions (no Python ``hash`` randomisation), so every
router and every restarted job routes an id to the same shard.
"""

from __future__ import annotations

import numpy as np

from raybackfill.hashing import splitmix64_finalize


def mix64(ids: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser of int64 ids, as uint64."""
    return splitmix64_finalize(np.asarray(ids, dtype=np.int64).view(np.uint64))


def shard_of(ids: np.ndarray, n_shards: int) -> np.ndarray:
    """The shard index (0..n_shards-1) of each id."""
    if n_shards <= 0:
        raise ValueError(f"n_shards must be positive, got {n_shards}")
    return (mix64(ids) % np.uint64(n_shards)).astype(np.int64)


def split_by_shard(ids: np.ndarray, n_shards: int) -> list[np.ndarray]:
    """For each shard, the positions (into ``ids``) of the ids it owns, in input order."""
    owner = shard_of(ids, n_shards)
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(n_shards + 1))
    return [order[bounds[s] : bounds[s + 1]] for s in range(n_shards)]
