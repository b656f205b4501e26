from __future__ import annotations

import numpy as np
import pytest

from raybackfill.data.info import class_names, table_info, with_class_names
from raybackfill.data.schema import embedding_table, image_table
from raybackfill.data.storage import StorageError, write_table


def test_info_of_a_sharded_image_table(tmp_path):
    table = with_class_names(image_table(np.arange(7), [b"x"] * 7, [0, 1, 1, 2, 2, 2, 0]), ["a", "b", "c"])
    out = str(tmp_path / "images")
    write_table(table, out, rows_per_shard=3)
    info = table_info(out)
    assert (info.rows, info.shards, info.classes) == (7, 3, 3)
    assert info.columns == {"id": "int64", "image": "binary", "label": "int32"}
    assert info.class_names == ["a", "b", "c"]
    assert info.embedding_dim is None


def test_info_of_an_embedding_table(tmp_path):
    table = embedding_table(np.arange(4), np.zeros((4, 16), dtype=np.float32), model="v1")
    out = str(tmp_path / "emb")
    write_table(table, out)
    info = table_info(out)
    assert (info.rows, info.shards, info.classes, info.embedding_dim) == (4, 1, None, 16)
    assert info.class_names is None


def test_info_of_a_missing_table_names_it(tmp_path):
    with pytest.raises(StorageError, match="nothing-here: no such table"):
        table_info(str(tmp_path / "nothing-here"))


def test_class_names_round_trip_and_absence():
    table = image_table([1], [b"x"], [0])
    assert class_names(table.schema) is None
    assert class_names(with_class_names(table, ["zero"]).schema) == ["zero"]
