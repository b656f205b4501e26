import numpy as np
import pyarrow as pa
import pytest

from raybackfill.data import storage
from raybackfill.data.images import encode_png
from raybackfill.data.loading import (
    gallery_content,
    gallery_shards,
    keep_rows,
    prepare_rows,
    prepare_values,
    quarantined_ids,
    read_gallery,
    read_shards,
)
from raybackfill.data.preprocessing import ImagePreprocessing, TextPreprocessing
from raybackfill.data.schema import SchemaError, image_table, text_table


def decode_images(ds, size, quarantine_uri=None):
    return prepare_rows(ds, {"pixels": ImagePreprocessing(crop=size)}, quarantine_uri=quarantine_uri)


def _gallery(n=12, size=8, corrupt=(), wrong_size=()):
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        side = size + 2 if i in wrong_size else size
        png = encode_png(rng.integers(0, 255, size=(side, side, 3), dtype=np.uint8))
        images.append(png[: len(png) // 2] if i in corrupt else png)
    return image_table(np.arange(n), images, labels=np.arange(n) % 3)


def test_ray_data_reads_local_table_with_projection(ray_cluster, tmp_path):
    uri = str(tmp_path / "g")
    storage.write_table(_gallery(), uri, rows_per_shard=5)
    ds = read_gallery(uri, columns=["id", "label"])
    rows = ds.take_all()
    assert sorted(r["id"] for r in rows) == list(range(12))
    assert set(rows[0]) == {"id", "label"}


def test_read_shards_cuts_one_large_shard_into_blocks_of_at_most_rows_per_block(ray_cluster, tmp_path):
    uri = str(tmp_path / "g")
    storage.write_table(_gallery(n=40), uri, rows_per_shard=30)  # shards of 30 and 10 rows
    ds = read_shards(storage.list_shards(uri), columns=["id"], rows_per_block=8)
    sizes = [len(block["id"]) for block in ds.iter_batches(batch_size=None, batch_format="numpy")]
    assert sum(sizes) == 40 and max(sizes) <= 8 and len(sizes) >= 5
    assert sorted(ds.to_pandas()["id"]) == list(range(40))
    assert ds.schema().names == ["id"]


def test_read_shards_of_a_missing_file_fails_before_any_read(ray_cluster, tmp_path):
    with pytest.raises(storage.StorageError, match="footer"):
        read_shards([str(tmp_path / "missing.parquet")])


def test_ray_data_reads_table_from_s3(ray_cluster, s3_bucket):
    uri = f"{s3_bucket}/gallery"
    storage.write_table(_gallery(), uri, rows_per_shard=5)
    assert sorted(read_gallery(uri, columns=["id"]).to_pandas()["id"]) == list(range(12))


def test_decode_yields_normalised_pixels(ray_cluster, tmp_path):
    uri = str(tmp_path / "g")
    storage.write_table(_gallery(n=4), uri)
    batch = decode_images(read_gallery(uri), size=8).take_batch(4)
    assert batch["pixels"].shape == (4, 3, 8, 8) and batch["pixels"].dtype == np.float32
    assert "image" not in batch
    assert batch["pixels"].min() >= -2.01 and batch["pixels"].max() <= 2.01


def test_corrupt_images_are_quarantined_and_other_sizes_resized_not_fatal(ray_cluster, tmp_path):
    uri, quarantine = str(tmp_path / "g"), str(tmp_path / "quarantine")
    storage.write_table(_gallery(corrupt=(3, 7), wrong_size=(5,)), uri, rows_per_shard=4)
    batch = decode_images(read_gallery(uri), size=8, quarantine_uri=quarantine).to_pandas()
    assert sorted(batch["id"]) == [0, 1, 2, 4, 5, 6, 8, 9, 10, 11]  # the 10x10 image is resized to 8x8
    assert sorted(quarantined_ids(quarantine, ("decode",))) == [3, 7]
    assert len(quarantined_ids(quarantine, ("embed",))) == 0
    reasons = dict(zip(*storage.read_table(quarantine).select(["id", "reason"]).to_pydict().values(), strict=True))
    assert "corrupt image bytes" in reasons[3] and "corrupt image bytes" in reasons[7]


def test_a_text_gallery_is_prepared_and_its_empty_texts_quarantined(ray_cluster, tmp_path):
    uri, quarantine = str(tmp_path / "t"), str(tmp_path / "quarantine")
    storage.write_table(text_table(np.arange(5), ["a cat", "", "two dogs", "   ", "fish"], labels=[0, 1, 0, 1, 0]), uri)
    assert gallery_content(uri) == "text"
    prep = TextPreprocessing(tokenizer="bytes", max_length=4)
    batch = prepare_rows(read_gallery(uri), {"tokens": prep}, quarantine_uri=quarantine).take_batch(10)
    order = np.argsort(batch["id"])
    assert batch["id"][order].tolist() == [0, 2, 4] and "text" not in batch
    assert batch["tokens"][order].tolist() == [[98, 33, 100, 98], [117, 120, 112, 33], [103, 106, 116, 105]]
    assert sorted(quarantined_ids(quarantine, ("decode",))) == [1, 3]


def test_prepare_values_keeps_every_row_in_place_with_the_first_reason():
    good, bad = encode_png(np.zeros((6, 9, 3), np.uint8)), b"not an image"
    out, reasons = prepare_values([good, bad, good], {"a": ImagePreprocessing(crop=4), "b": ImagePreprocessing(crop=2)})
    assert out["a"].shape == (3, 3, 4, 4) and out["b"].shape == (3, 3, 2, 2)
    assert (out["a"][1] == 0).all() and reasons[0] == reasons[2] == "" and "corrupt image bytes" in reasons[1]


def test_schema_errors_are_raised_before_any_read(ray_cluster, tmp_path):
    uri = str(tmp_path / "g")
    storage.write_table(_gallery().drop(["label"]), uri)
    with pytest.raises(SchemaError, match="part-00000.parquet: missing column 'label'"):
        read_gallery(uri, require_label=True)


def test_an_empty_shard_file_is_named_before_any_read(tmp_path):
    uri = str(tmp_path / "g")
    storage.write_table(_gallery(), uri)
    (tmp_path / "g" / "part-00001.parquet").write_bytes(b"")
    with pytest.raises(storage.StorageError, match="part-00001.parquet: cannot read parquet footer"):
        gallery_shards(uri)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_cli_synth_writes_a_50_row_table_that_ray_data_reads_back(ray_cluster, tmp_path, s3_bucket, where):
    from raybackfill.cli.main import main

    uri = str(tmp_path / "synth") if where == "local" else f"{s3_bucket}/synth"
    assert main(["data", "synth", "--out", uri, "--classes", "10", "--per-class", "5", "--seed", "0"]) == 0
    batch = decode_images(read_gallery(uri, require_label=True), size=32).take_batch(100)
    assert sorted(batch["id"]) == list(range(50))
    assert sorted(set(batch["label"])) == list(range(10))
    assert batch["pixels"].shape == (50, 3, 32, 32)


def test_keep_rows_keeps_exactly_the_ids_still_to_do():
    batch = pa.table({"id": pa.array([9, 2, 7, 4, 11], pa.int64()), "x": ["a", "b", "c", "d", "e"]})
    kept = keep_rows(batch, np.array([2, 4, 5, 11]))
    assert kept.column("id").to_pylist() == [2, 4, 11] and kept.column("x").to_pylist() == ["b", "d", "e"]
    assert keep_rows(batch, np.array([], np.int64)).num_rows == 0
    assert keep_rows(batch, np.array([100])).num_rows == 0  # beyond every id: no false match at the end
