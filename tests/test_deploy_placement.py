"""RouterConfig.node_resource: where the index actors may run (tests/test_metrics_export.py places a real index
with it on a node that declares the resource)."""

from __future__ import annotations

import pytest

from raybackfill.cli.main import build_parser
from raybackfill.index.router import NODE_RESOURCE_SHARE, RouterConfig


def test_by_default_the_index_asks_for_no_custom_resource():
    assert RouterConfig().node_resource is None
    assert RouterConfig().actor_resources() == {}  # local runs place the actors as before


def test_a_node_resource_is_asked_for_by_a_sliver_per_actor():
    config = RouterConfig(node_resource="index_node", shards=8)
    assert config.actor_resources() == {"index_node": NODE_RESOURCE_SHARE}
    # A node declaring index_node: 1 holds the router and all 8 shards many times over.
    assert (config.shards + 1) * NODE_RESOURCE_SHARE < 1


def test_an_empty_resource_name_is_refused():
    with pytest.raises(ValueError, match="node_resource"):
        RouterConfig(node_resource="")


def test_serve_takes_the_node_resource_flag():
    args = build_parser().parse_args(["serve", "--old-embeddings", "emb", "--node-resource", "index_node"])
    assert args.node_resource == "index_node"
    assert build_parser().parse_args(["serve", "--old-embeddings", "emb"]).node_resource is None
