"""Whole-input checks of a backfill (raybackfill/backfill/inputs.py) that need no Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from raybackfill.backfill.inputs import check_inputs
from raybackfill.data.images import encode_png
from raybackfill.data.schema import SchemaError, embedding_table
from raybackfill.data.storage import write_table
from raybackfill.models.artifacts import ModelSpec, save_model
from raybackfill.models.registry import build_model

OLD, NEW, SIDE = 6, 8, 3


@pytest.fixture
def gallery(tmp_path) -> str:
    uri = str(tmp_path / "gallery")
    image = encode_png(np.zeros((4, 4, 3), np.uint8))
    write_table(pa.table({"id": pa.array([1, 2], pa.int64()), "image": pa.array([image, image], pa.binary())}), uri)
    return uri


@pytest.fixture
def side_info_transformation(tmp_path) -> str:
    torch.manual_seed(0)
    kwargs = {"old_dim": OLD, "new_dim": NEW, "side_dim": SIDE, "hidden_dim": 8, "mixer_dim": 8}
    uri = str(tmp_path / "fastfill")
    module = build_model("fastfill_transformation", **kwargs).eval()
    save_model(module, uri, ModelSpec("fastfill_transformation", "ff-v1", kwargs, method="fastfill_side_info"))
    return uri


@pytest.fixture
def upgrade(tmp_path) -> str:
    kwargs = {"embedding_dim": NEW, "num_classes": 2, "width": 4}
    uri = str(tmp_path / "new")
    save_model(build_model("small_cnn", **kwargs).eval(), uri, ModelSpec("small_cnn", "v2", kwargs))
    return uri


def old_table(tmp_path, name: str, side_dim: int | None) -> str:
    side = None if side_dim is None else np.zeros((2, side_dim), np.float32)
    uri = str(tmp_path / name)
    write_table(embedding_table(np.array([1, 2]), np.ones((2, OLD), np.float32), side_info=side), uri)
    return uri


def test_a_side_info_transformation_needs_side_info_of_its_dim_in_the_old_embeddings(
    tmp_path, gallery, side_info_transformation, upgrade
):
    with pytest.raises(SchemaError, match=r"part-00000\.parquet: missing column 'side_info'.*--side-info-model"):
        check_inputs(gallery, old_table(tmp_path, "no-side", None), upgrade, side_info_transformation)
    with pytest.raises(SchemaError, match=r"column 'side_info' has dim 5, but the transformation .* reads dim 3"):
        check_inputs(gallery, old_table(tmp_path, "wrong-side", 5), upgrade, side_info_transformation)
    check_inputs(gallery, old_table(tmp_path, "with-side", SIDE), upgrade, side_info_transformation)
