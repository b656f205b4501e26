"""Child process of tests/test_index_multinode.py: a two-node Ray cluster on loopback (ray.cluster_utils.Cluster),
an index of four shards over it, a gallery loaded and queried; prints one JSON line with where each shard runs
and the answers."""

from __future__ import annotations

import json
import sys

import numpy as np
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from raybackfill.index.router import RouterConfig, create_index, destroy_index, get
from raybackfill.types import Space, Strategy


def main() -> None:
    n, d, k = 2000, 16, 10
    rng = np.random.default_rng(0)
    old = rng.standard_normal((n, d)).astype(np.float32)
    new = rng.standard_normal((n, d)).astype(np.float32)
    queries = rng.standard_normal((20, d)).astype(np.float32)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        router = create_index(RouterConfig(name="multinode", shards=4, shard_num_cpus=0.25))
        get(router.load_old.remote(np.arange(n), old, "v1"))
        get(router.upsert.remote(np.arange(0, n, 2), new[::2], Space.NEW, "v2"))
        found = get(router.search.remote(queries, queries, k, Strategy.RANK_MERGE))
        shards = list_actors(filters=[("class_name", "=", "IndexShard"), ("state", "=", "ALIVE")])
        print(
            json.dumps(
                {
                    "nodes": len({node["NodeID"] for node in ray.nodes() if node["Alive"]}),
                    "shard_nodes": sorted({actor.node_id for actor in shards}),
                    "ids": found.ids.tolist(),
                    "scores": found.scores.tolist(),
                }
            )
        )
        destroy_index("multinode")
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
