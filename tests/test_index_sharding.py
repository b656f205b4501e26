"""Id -> shard routing: a stable, well-mixed, vectorised hash."""

from __future__ import annotations

import numpy as np
import pytest

from raybackfill.index.sharding import mix64, shard_of, split_by_shard

MASK = (1 << 64) - 1


def splitmix64_finaliser(x: int) -> int:
    """Reference in Python integers (independent of numpy's uint64 wrap-around)."""
    x &= MASK
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def test_mix64_matches_the_python_integer_reference():
    ids = np.array([0, 1, 2, 12345, 2**40 + 7, 2**63 - 1], dtype=np.int64)
    assert mix64(ids).tolist() == [splitmix64_finaliser(int(i)) for i in ids]


def test_routing_is_stable_and_balanced_for_sequential_ids():
    ids = np.arange(30_000)
    owner = shard_of(ids, 3)
    np.testing.assert_array_equal(owner, shard_of(ids.copy(), 3))
    counts = np.bincount(owner, minlength=3)
    assert counts.min() > 9_500 and counts.max() < 10_500
    assert len(set(owner[:12].tolist())) > 1  # unlike id % S, neighbours spread over shards


def test_split_by_shard_partitions_positions_in_input_order():
    ids = np.array([17, 3, 99, 42, 5, 8, 1000])
    groups = split_by_shard(ids, 3)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(ids)))
    for shard, positions in enumerate(groups):
        assert (shard_of(ids[positions], 3) == shard).all()
        assert list(positions) == sorted(positions)
    with pytest.raises(ValueError, match="n_shards must be positive"):
        shard_of(ids, 0)
