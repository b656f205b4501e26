"""Stable integer hashing for ids (pure numpy): the same id gives the same value in every process and version.

Shard routing and the random backfill order both need a well-mixed, reproducible function of an id; Python's
``hash`` is randomised per process, so they share SplitMix64's finaliser instead.
"""

from __future__ import annotations

import numpy as np

__all__ = ["GOLDEN_GAMMA", "splitmix64_finalize"]

GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment, 2^64 / golden ratio
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)


def splitmix64_finalize(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser of uint64 values: a bijective, well-mixed map (wrap-around arithmetic).

    Args:
        x: uint64 values (int64 ids viewed as uint64).

    Returns:
        A new uint64 array of the same shape.

    Example:
        >>> int(splitmix64_finalize(np.array([1], dtype=np.uint64))[0]) == 0x5692161D100B05E5
        True
    """
    x = np.array(x, dtype=np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= _C1
        x ^= x >> np.uint64(27)
        x *= _C2
        x ^= x >> np.uint64(31)
    return x
