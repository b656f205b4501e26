"""An index over two Ray nodes (ray.cluster_utils.Cluster on loopback, in a child process so the session's Ray is
untouched): the shards spread over both nodes, and a merged query answers what one exact scan of the same
gallery answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_shards_spread_over_two_nodes_and_answer_as_one_exact_scan():
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(HERE.parent)}
    done = subprocess.run(
        [sys.executable, str(HERE / "multinode_index.py")], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["nodes"] == 2 and len(result["shard_nodes"]) == 2  # four shards, both nodes hold some
    # The same gallery scanned exactly in one process (the child's seed and shapes): even ids were moved to the
    # new space, odd ids are still old; rank_merge scores each item in its own space (cosine).
    n, d, k = 2000, 16, 10
    rng = np.random.default_rng(0)
    old, new, queries = (rng.standard_normal(shape).astype(np.float32) for shape in ((n, d), (n, d), (20, d)))
    gallery = _unit(np.where((np.arange(n) % 2 == 0)[:, None], new, old))
    scores = _unit(queries) @ gallery.T
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    found, found_scores = np.array(result["ids"]), np.array(result["scores"])
    np.testing.assert_allclose(found_scores, np.take_along_axis(scores, expected, axis=1), rtol=1e-5, atol=1e-5)
    assert (np.sort(found, axis=1) == np.sort(expected, axis=1)).all()
