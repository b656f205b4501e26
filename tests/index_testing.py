"""Shared by the index tests: a brute-force numpy reference of the serving strategies, restart helper."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError

from raybackfill.types import Space

OLD, TRANSFORMED, NEW = (space.code for space in Space)


@dataclass
class Gallery:
    """Every item's old vector, its new-space vector (if any) and state, as the index should hold them."""

    ids: np.ndarray
    old: np.ndarray
    new: np.ndarray
    state: np.ndarray

    @classmethod
    def random(cls, n: int, d: int, seed: int = 0, first_id: int = 1000) -> Gallery:
        rng = np.random.default_rng(seed)
        ids = first_id + rng.permutation(10 * n)[:n].astype(np.int64)
        return cls(
            ids, rng.standard_normal((n, d)).astype(np.float32), np.zeros((n, d), np.float32), np.full(n, OLD, np.int8)
        )

    def upsert(self, positions: np.ndarray, vectors: np.ndarray, state: str) -> None:
        self.new[positions] = vectors
        self.state[positions] = TRANSFORMED if state == "transformed" else NEW

    def promote(self) -> Gallery:
        """The gallery after a promote: the new-space vectors serve as the next upgrade's old space."""
        assert (self.state != OLD).all(), "promote needs every item in the new space"
        return Gallery(self.ids, self.new.copy(), np.zeros_like(self.new), np.full(len(self.ids), OLD, np.int8))


def unit(x: np.ndarray) -> np.ndarray:
    """Rows at unit length: what a cosine index stores."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(g: Gallery, q_old, q_new, k: int, strategy: str, metric: str = "cosine"):
    """(ids, scores, spaces) top-k, better score first then lower id, -1 padded."""
    moved = g.state != OLD

    def score(q, x):
        q, x = q.astype(np.float64), x.astype(np.float64)
        if metric == "cosine":
            q, x = (a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-30) for a in (q, x))  # 0 rows: unused
        if metric in ("cosine", "ip"):
            return q @ x.T
        return ((q[:, None, :] - x[None]) ** 2).sum(-1)

    if strategy == "old":
        scores, spaces = score(q_old, g.old), np.full(len(g.ids), OLD, np.int8)
    elif strategy == "compatible":
        scores, spaces = np.where(moved, score(q_new, g.new), score(q_new, g.old)), np.where(moved, g.state, OLD)
    else:  # rank_merge
        scores, spaces = np.where(moved, score(q_new, g.new), score(q_old, g.old)), np.where(moved, g.state, OLD)
    key = -scores if metric == "l2" else scores
    order = np.lexsort((np.broadcast_to(g.ids, scores.shape), -key), axis=-1)[:, :k]
    rows = np.arange(scores.shape[0])[:, None]
    return g.ids[order], scores[rows, order], np.broadcast_to(spaces, scores.shape)[rows, order]


def assert_matches(result, expected, atol: float = 1e-4) -> None:
    """The result equals the reference; columns beyond the gallery size are empty (-1) slots."""
    ids, scores, spaces = expected
    width = ids.shape[1]
    np.testing.assert_array_equal(result.ids[:, :width], ids)
    np.testing.assert_allclose(result.scores[:, :width], scores, rtol=1e-5, atol=atol)
    np.testing.assert_array_equal(result.spaces[:, :width], spaces)
    assert (result.ids[:, width:] == -1).all()


def assert_each_id_exactly_once(result, all_ids: np.ndarray) -> None:
    for row in result.ids:
        np.testing.assert_array_equal(np.sort(row), np.sort(all_ids))


def actor_pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)


def kill_and_wait_for_restart(actor, timeout: float = 60.0) -> None:
    """ray.kill(no_restart=False) is asynchronous: wait until a new process answers."""
    pid = actor_pid(actor)
    ray.kill(actor, no_restart=False)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if actor_pid(actor) != pid:
                return
        except (RayActorError, GetTimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the actor did not restart")
        time.sleep(0.2)
