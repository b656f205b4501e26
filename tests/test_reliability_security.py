"""Security: a model directory holding a crafted pickle, or a model.json naming code to run, is refused by the
backfill before anything runs, and one query client cannot make the router or a shard allocate without bound
(k and query batch)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import test_backfill_run as backfill_run
import torch
from test_backfill_run import DIM, N

from raybackfill.backfill.run import BackfillConfig, run_backfill
from raybackfill.embed.pipeline import PoolConfig
from raybackfill.encoders import UntrustedEntrypointError
from raybackfill.index.router import RouterConfig, create_index, destroy_index, get
from raybackfill.index.shard import IndexConfig
from raybackfill.models.artifacts import ArtifactError

inputs = backfill_run.inputs


class _Payload:
    """Unpickling this would create a file: the marker proves whether stored code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_backfill_refuses_a_model_dir_with_a_crafted_pickle_without_running_it(inputs, tmp_path):
    model = tmp_path / "upgrade"
    model.mkdir()
    spec = json.loads((Path(inputs["new"]) / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**spec, "weights": "model.pt"}))
    marker = tmp_path / "pwned"
    torch.save({"trunk.0.0.weight": _Payload(str(marker))}, model / "model.pt")
    out = tmp_path / "out"
    config = BackfillConfig(
        gallery=inputs["gallery"], old_embeddings=inputs["old"], upgrade=str(model), out=str(out), method="bct",
        policy="id", index=None, pool=PoolConfig(batch_size=4), progress=False,
    )  # fmt: skip
    with pytest.raises(ArtifactError, match=r"upgrade/model\.pt: refused"):
        run_backfill(config)
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("kind", ["entrypoint", "torchvision"])
def test_a_backfill_refuses_a_model_json_that_names_code_or_pickles_without_running_either(inputs, tmp_path, kind):
    """A model.json naming an entrypoint (stored code) is refused unless the user trusts it; a torchvision
    artefact whose weights are a crafted pickle is refused by the weights-only loader."""
    model = tmp_path / "upgrade"
    model.mkdir()
    marker = tmp_path / "pwned"
    module = tmp_path / "evil_encoder.py"
    module.write_text(f"open({str(marker)!r}, 'w').close()\ndef make():\n    return None\n")
    fields = {"format_version": 1, "version": "v-evil", "preprocessing": {"crop": 16}}
    if kind == "entrypoint":
        fields |= {"kind": "entrypoint", "architecture": "", "entrypoint": "evil_encoder:make"}
        expected = UntrustedEntrypointError, "names the entrypoint 'evil_encoder:make'"
    else:
        fields |= {"kind": "torchvision", "architecture": "resnet18", "weights": "model.pt"}
        torch.save({"conv1.weight": _Payload(str(marker))}, model / "model.pt")
        expected = ArtifactError, r"upgrade/model\.pt: refused"
    (model / "model.json").write_text(json.dumps(fields))
    config = BackfillConfig(
        gallery=inputs["gallery"], old_embeddings=inputs["old"], upgrade=str(model), out=str(tmp_path / "out"),
        method="bct", policy="id", index=None, pool=PoolConfig(batch_size=4), progress=False,
    )  # fmt: skip
    sys.path.insert(0, str(tmp_path))  # importable: only trust stands between the model.json and the code
    try:
        with pytest.raises(expected[0], match=expected[1]):
            run_backfill(config)
    finally:
        sys.path.remove(str(tmp_path))
    assert not marker.exists() and not (tmp_path / "out").exists() and "evil_encoder" not in sys.modules


def test_the_router_bounds_k_and_the_query_batch_and_keeps_serving(ray_cluster):
    name = "rel-bounds"
    router = create_index(
        RouterConfig(name=name, shards=2, shard_num_cpus=0.1, index=IndexConfig(max_k=8, max_queries=4))
    )
    try:
        vectors = np.random.default_rng(0).standard_normal((N, DIM)).astype(np.float32)
        get(router.load_old.remote(np.arange(N), vectors, "old-v1"))
        q = vectors[:4]
        with pytest.raises(ValueError, match="k must be between 1 and 8, got 9"):
            get(router.search.remote(q, None, 9, "old"))
        with pytest.raises(ValueError, match="queries_old has 5 queries, more than the limit of 4 per call"):
            get(router.search.remote(np.ones((5, DIM), np.float32), None, 3, "old"))
        with pytest.raises(ValueError, match="queries_new has 5 queries"):
            get(router.search.remote(q, np.ones((5, DIM), np.float32), 3, "rank_merge"))
        result = get(router.search.remote(q, None, 8, "old"))  # still serving, at the limits
        assert result.ids.shape == (4, 8) and (result.ids >= 0).all()
    finally:
        destroy_index(name)
