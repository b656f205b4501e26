from __future__ import annotations

import csv
import gzip
import json
import os
import pickle
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from real_data import write_mixed_image_folder

from raybackfill.data.images import decode_rgb, encode_png
from raybackfill.data.importers import (
    DatasetImportError,
    ImportResult,
    import_cifar,
    import_idx,
    import_image_folder,
    import_text,
    load_cifar_pickle,
    read_idx,
)
from raybackfill.data.info import class_names
from raybackfill.data.loading import quarantined_ids
from raybackfill.data.preprocessing import decode_image
from raybackfill.data.schema import TEXT, validate_gallery_schema, validate_image_table
from raybackfill.data.storage import ShardExistsError, list_shards, read_table
from raybackfill.types import Stage


def _pixels(seed: int, h: int = 6, w: int = 6, channels: int = 3) -> np.ndarray:
    shape = (h, w, channels) if channels else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- folder


@pytest.fixture
def folder(tmp_path):
    """dogs/ and cats/ with two PNGs each, plus files the importer must skip."""
    root = tmp_path / "folder"
    for c, name in enumerate(["dogs", "cats"]):
        (root / name).mkdir(parents=True)
        for i in range(2):
            (root / name / f"img{i}.png").write_bytes(encode_png(_pixels(10 * c + i)))
    (root / "cats" / "notes.txt").write_text("not an image")
    (root / "cats" / ".hidden.png").write_bytes(b"junk")
    (root / "README").write_text("a file at the root is not a class")
    return root


def test_image_folder_labels_follow_sorted_class_names(ray_cluster, folder, tmp_path):
    out = str(tmp_path / "out")
    result = import_image_folder(str(folder), out)
    table = validate_image_table(read_table(out), out, require_label=True)
    assert result.rows == 4
    assert table.column("id").to_pylist() == [0, 1, 2, 3]
    assert table.column("path").to_pylist() == ["cats/img0.png", "cats/img1.png", "dogs/img0.png", "dogs/img1.png"]
    assert table.column("label").to_pylist() == [0, 0, 1, 1]
    assert class_names(table.schema) == ["cats", "dogs"]


def test_image_folder_keeps_png_bytes_unchanged(ray_cluster, folder, tmp_path):
    out = str(tmp_path / "out")
    import_image_folder(str(folder), out)
    table = read_table(out)
    for rel, data in zip(table.column("path").to_pylist(), table.column("image").to_pylist(), strict=True):
        assert data == (folder / rel).read_bytes()


def test_image_folder_resizes_and_converts_other_formats_to_png(ray_cluster, folder, tmp_path):
    Image.fromarray(_pixels(5, h=10, w=20)).save(folder / "dogs" / "wide.bmp")
    out = str(tmp_path / "out")
    import_image_folder(str(folder), out, size=4)
    table = read_table(out)
    assert "dogs/wide.bmp" in table.column("path").to_pylist()
    for data in table.column("image").to_pylist():
        assert data[:4] == b"\x89PNG"
        assert decode_rgb(data).shape == (4, 4, 3)


def test_image_folder_limit_and_shards(ray_cluster, folder, tmp_path):
    out = str(tmp_path / "out")
    result = import_image_folder(str(folder), out, limit=3, rows_per_shard=2)
    assert result.rows == 3
    assert len(list_shards(out)) == 2
    assert read_table(out).column("id").to_pylist() == [0, 1, 2]


def test_image_folder_quarantines_the_unreadable_file_and_goes_on(ray_cluster, folder, tmp_path):
    (folder / "dogs" / "broken.png").write_bytes(b"\x89PNG not really")
    out = str(tmp_path / "out")
    result = import_image_folder(str(folder), out)
    assert (result.rows, result.quarantined) == (4, 1)
    # Ids follow the sorted paths of every file, the quarantined one included: a re-import gives the same ids.
    table = read_table(out)
    assert table.column("path").to_pylist() == ["cats/img0.png", "cats/img1.png", "dogs/img0.png", "dogs/img1.png"]
    assert table.column("id").to_pylist() == [0, 1, 3, 4]
    quarantine = read_table(result.quarantine_uri).to_pylist()
    assert len(quarantine) == 1 and quarantine[0]["id"] == 2 and quarantine[0]["stage"] == Stage.IMPORT
    assert quarantine[0]["reason"].startswith("dogs/broken.png: ")


def test_image_folder_as_it_comes_keeps_every_good_file_unchanged(ray_cluster, tmp_path):
    mixed = write_mixed_image_folder(tmp_path / "photos")
    out = str(tmp_path / "out")
    result = import_image_folder(str(mixed["root"]), out, rows_per_shard=4)
    assert isinstance(result, ImportResult)
    assert (result.rows, result.quarantined, len(result.shards)) == (len(mixed["good"]), 1, 3)
    table = validate_image_table(read_table(out), out, require_label=True)
    ids = [i for i in range(len(mixed["files"])) if i != mixed["corrupt_id"]]
    assert table.column("id").to_pylist() == ids
    assert table.column("path").to_pylist() == mixed["good"]
    assert class_names(table.schema) == mixed["classes"]
    labels = [mixed["classes"].index(rel.split("/")[0]) for rel in mixed["good"]]
    assert table.column("label").to_pylist() == labels
    for rel, data in zip(mixed["good"], table.column("image").to_pylist(), strict=True):
        assert data == (mixed["root"] / rel).read_bytes(), rel  # no re-encoding, whatever the format or mode
        assert decode_image(data).size == mixed["sizes"][rel], rel  # and the embed step reads it upright
    quarantine = read_table(f"{out}/_quarantine").to_pylist()
    assert [row["id"] for row in quarantine] == [mixed["corrupt_id"]]
    assert quarantine[0]["reason"].startswith(f"{mixed['corrupt']}: ") and quarantine[0]["stage"] == "import"
    assert quarantined_ids(f"{out}/_quarantine", (Stage.IMPORT,)).tolist() == [mixed["corrupt_id"]]


def test_image_folder_with_size_makes_upright_squares_of_every_mode(ray_cluster, tmp_path):
    mixed = write_mixed_image_folder(tmp_path / "photos")
    out = str(tmp_path / "out")
    assert import_image_folder(str(mixed["root"]), out, size=12).quarantined == 1
    table = read_table(out)
    for rel, data in zip(table.column("path").to_pylist(), table.column("image").to_pylist(), strict=True):
        assert data[:4] == b"\x89PNG" and decode_rgb(data).shape == (12, 12, 3), rel
    # The EXIF-rotated photo (48x32 as stored, 32x48 upright): its gradient runs along the upright image's height.
    rotated = decode_rgb(table.column("image")[table.column("path").to_pylist().index("plants/camera_rotated.jpg")]
                         .as_py()).astype(int)  # fmt: skip
    assert rotated[-1, :, 0].mean() > rotated[0, :, 0].mean() + 100


def test_image_folder_where_nothing_decodes_is_an_error(ray_cluster, tmp_path):
    for name in ("a", "b"):
        (tmp_path / "src" / name).mkdir(parents=True)
        (tmp_path / "src" / name / "x.jpg").write_bytes(os.urandom(100))
    out = tmp_path / "out"
    with pytest.raises(DatasetImportError, match=r"src: none of the 2 image files decodes .*first: a/x\.jpg: "):
        import_image_folder(str(tmp_path / "src"), str(out))
    assert list_shards(str(out)) == []  # no table, only the quarantine with both reasons
    assert sorted(read_table(str(out / "_quarantine")).column("id").to_pylist()) == [0, 1]


def test_image_folder_refuses_a_table_with_shards_before_reading(folder, tmp_path):
    out = str(tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part-00000.parquet").write_bytes(b"")
    with pytest.raises(ShardExistsError, match="already has shards"):
        import_image_folder(str(folder), out)


def test_image_folder_rejects_empty_class_and_missing_root(folder, tmp_path):
    (folder / "birds").mkdir()
    with pytest.raises(DatasetImportError, match="without image files.*birds"):
        import_image_folder(str(folder), str(tmp_path / "out"))
    with pytest.raises(DatasetImportError, match="not a directory"):
        import_image_folder(str(tmp_path / "nowhere"), str(tmp_path / "out"))


# ----------------------------------------------------------------------------------------------- CIFAR


def _cifar_rows(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n images (N, 32, 32, 3) and their CIFAR row encoding (N, 3072): all red, then green, then blue."""
    images = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return images, images.transpose(0, 3, 1, 2).reshape(n, 3072)


def _dump(path, obj, protocol: int = 2) -> None:
    # Protocol 2 is what the original (python 2 cPickle) CIFAR files use.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


@pytest.fixture
def cifar10(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    images = []
    for i, n in ((1, 3), (2, 2)):
        imgs, rows = _cifar_rows(i, n)
        images.append(imgs)
        _dump(root / f"data_batch_{i}", {b"batch_label": b"training batch", b"data": rows, b"labels": [i, 0, 9][:n]})
    test_imgs, test_rows = _cifar_rows(9, 2)
    _dump(root / "test_batch", {b"data": test_rows, b"labels": [3, 4]})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump(root / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return root, np.concatenate(images), test_imgs


def test_cifar10_train_batches_in_order_with_class_names(cifar10, tmp_path):
    root, images, _ = cifar10
    out = str(tmp_path / "out")
    result = import_cifar(str(root), out)
    table = validate_image_table(read_table(out), out, require_label=True)
    assert result.rows == 5
    assert table.column("id").to_pylist() == [0, 1, 2, 3, 4]
    assert table.column("label").to_pylist() == [1, 0, 9, 2, 0]
    for data, expected in zip(table.column("image").to_pylist(), images, strict=True):
        np.testing.assert_array_equal(decode_rgb(data), expected)
    assert class_names(table.schema)[:3] == ["airplane", "automobile", "bird"]


def test_cifar10_test_split_and_limit(cifar10, tmp_path):
    root, _, test_images = cifar10
    out = str(tmp_path / "test")
    import_cifar(str(root), out, split="test")
    assert read_table(out).column("label").to_pylist() == [3, 4]
    np.testing.assert_array_equal(decode_rgb(read_table(out).column("image")[1].as_py()), test_images[1])
    limited = str(tmp_path / "limited")
    assert import_cifar(str(root), limited, limit=4, rows_per_shard=3).rows == 4
    assert len(list_shards(limited)) == 2


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar100_fine_labels_from_a_single_file(tmp_path, protocol):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    images, rows = _cifar_rows(4, 3)
    _dump(root / "train", {b"data": rows, b"fine_labels": [7, 99, 0], b"coarse_labels": [1, 2, 3]}, protocol)
    _dump(root / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, protocol)
    out = str(tmp_path / "out")
    import_cifar(str(root / "train"), out)
    table = read_table(out)
    assert table.column("label").to_pylist() == [7, 99, 0]
    np.testing.assert_array_equal(decode_rgb(table.column("image")[2].as_py()), images[2])
    assert class_names(table.schema)[99] == "c99"


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    _dump(path, {b"data": _Exploit(str(marker)), b"labels": [0]})
    with pytest.raises(DatasetImportError, match=r"data_batch_1: refusing to load '(posix|nt|os)\.system'"):
        load_cifar_pickle(str(path))
    with pytest.raises(DatasetImportError, match="refusing"):
        import_cifar(str(path), str(tmp_path / "out"))
    assert not marker.exists()


def test_cifar_malformed_files_are_named(tmp_path):
    truncated = tmp_path / "data_batch_1"
    _dump(truncated, {b"data": _cifar_rows(0, 2)[1], b"labels": [0, 1]})
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(DatasetImportError, match="data_batch_1: truncated or malformed pickle"):
        import_cifar(str(truncated), str(tmp_path / "out"))
    wrong = tmp_path / "test_batch"
    _dump(wrong, {b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DatasetImportError, match=r"test_batch: 'data' must be uint8 of shape \(N, 3072\)"):
        import_cifar(str(wrong), str(tmp_path / "out2"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetImportError, match="empty: no CIFAR train batches found"):
        import_cifar(str(tmp_path / "empty"), str(tmp_path / "out3"))


# ------------------------------------------------------------------------------------------------- IDX


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def mnist(tmp_path):
    images = np.stack([_pixels(i, h=5, w=7, channels=0) for i in range(4)])
    labels = np.array([3, 1, 4, 1], dtype=np.uint8)
    root = tmp_path / "mnist"
    root.mkdir()
    (root / "train-images-idx3-ubyte").write_bytes(_idx_bytes(images))
    (root / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images[:2])))
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels[:2])))
    return root, images, labels


def test_read_idx_parses_header_and_big_endian_data(tmp_path):
    path = tmp_path / "shorts-idx2"
    values = np.array([[1, 256], [-2, 30000]], dtype=">i2")
    path.write_bytes(bytes([0, 0, 0x0B, 2]) + struct.pack(">2I", 2, 2) + values.tobytes())
    np.testing.assert_array_equal(read_idx(str(path)), [[1, 256], [-2, 30000]])


def test_idx_images_become_rgb_with_labels(mnist, tmp_path):
    root, images, labels = mnist
    out = str(tmp_path / "out")
    result = import_idx(str(root / "train-images-idx3-ubyte"), out, rows_per_shard=3)
    table = validate_image_table(read_table(out), out, require_label=True)
    assert result.rows == 4 and len(result.shards) == 2
    assert table.column("label").to_pylist() == labels.tolist()
    for data, grey in zip(table.column("image").to_pylist(), images, strict=True):
        rgb = decode_rgb(data)
        assert rgb.shape == (5, 7, 3)
        for channel in range(3):
            np.testing.assert_array_equal(rgb[:, :, channel], grey)


def test_idx_gzip_test_split_from_a_directory(mnist, tmp_path):
    root, images, labels = mnist
    out = str(tmp_path / "out")
    import_idx(str(root), out, split="test", limit=1)
    table = read_table(out)
    assert table.column("label").to_pylist() == [int(labels[0])]
    np.testing.assert_array_equal(decode_rgb(table.column("image")[0].as_py())[:, :, 0], images[0])


def test_idx_bad_files_are_named(mnist, tmp_path):
    root, _, _ = mnist
    bad = tmp_path / "bad-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x99\x03" + b"\x00" * 20)
    with pytest.raises(DatasetImportError, match="bad-images-idx3-ubyte: not an IDX file"):
        read_idx(str(bad))
    short = tmp_path / "short-images-idx3-ubyte"
    short.write_bytes(_idx_bytes(np.zeros((2, 3, 3)))[:-1])
    with pytest.raises(DatasetImportError, match=r"short-images-idx3-ubyte: IDX dims \(2, 3, 3\) need 18"):
        read_idx(str(short))
    with pytest.raises(DatasetImportError, match="labels file .*short-labels-idx1-ubyte not found"):
        import_idx(str(short), str(tmp_path / "out"))
    os.remove(root / "train-labels-idx1-ubyte")
    (root / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3)))
    with pytest.raises(DatasetImportError, match=r"train-labels-idx1-ubyte: expected 4 labels"):
        import_idx(str(root), str(tmp_path / "out"))


def test_importers_refuse_to_overwrite_an_existing_table(mnist, tmp_path):
    root, _, _ = mnist
    out = str(tmp_path / "out")
    import_idx(str(root), out)
    with pytest.raises(FileExistsError):
        import_idx(str(root), out)


# ------------------------------------------------------------------------------------------------ text

# Real-world texts: unicode, commas, quotes, a newline inside a text, ids not in order, string labels, and two
# rows without a usable text (one empty, one whitespace only).
TEXT_ROWS = [
    {"id": 10, "text": "A cat sat on the mat.", "label": "cat"},
    {"id": 3, "text": 'Dogs say "woof", loudly', "label": "dog"},
    {"id": 7, "text": "", "label": "dog"},
    {"id": 42, "text": "Vögel — birds, 鳥\nsecond line", "label": "bird"},
    {"id": 5, "text": "   ", "label": "cat"},
    {"id": 8, "text": "  leading and trailing spaces kept  ", "label": "bird"},
]
GOOD = [0, 1, 3, 5]  # indexes of TEXT_ROWS with a usable text


def _write_text(path, rows: list[dict], fmt: str) -> str:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    elif fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.parametrize("fmt, name", [("jsonl", "texts.jsonl"), ("csv", "texts.csv"), ("parquet", "texts.parquet")])
def test_text_formats_give_the_same_table(tmp_path, fmt, name):
    src = _write_text(tmp_path / name, TEXT_ROWS, fmt)
    out = str(tmp_path / "out")
    result = import_text(src, out, rows_per_shard=3)
    assert (result.rows, result.quarantined, len(result.shards)) == (4, 2, 2)
    table = read_table(out)
    validate_gallery_schema(table.schema, out, require_label=True, column=TEXT)
    assert table.schema.field("id").type == pa.int64() and table.schema.field("label").type == pa.int32()
    assert table.column("id").to_pylist() == [TEXT_ROWS[i]["id"] for i in GOOD]  # file order, not sorted
    assert table.column("text").to_pylist() == [TEXT_ROWS[i]["text"] for i in GOOD]  # unchanged
    # String labels -> indexes of the sorted names, which travel with the table.
    assert class_names(table.schema) == ["bird", "cat", "dog"]
    assert table.column("label").to_pylist() == [1, 2, 0, 0]
    quarantine = read_table(result.quarantine_uri).sort_by("id").to_pylist()
    assert quarantine == [{"id": 5, "reason": "empty text", "stage": "import"},
                          {"id": 7, "reason": "empty text", "stage": "import"}]  # fmt: skip


def test_text_integer_labels_are_kept_and_missing_texts_quarantined(tmp_path):
    src = tmp_path / "data.ndjson"
    src.write_text('{"id": 1, "text": "one", "label": 4}\n\n{"id": 2, "label": "0"}\n'
                   '{"id": 3, "text": null, "label": 2}\n{"id": 4, "text": 17, "label": 9}\n'
                   '{"id": 5, "text": "five", "label": 2.0}\n')  # fmt: skip
    out = str(tmp_path / "out")
    result = import_text(str(src), out)
    table = read_table(out)
    assert table.column("id").to_pylist() == [1, 5] and table.column("label").to_pylist() == [4, 2]
    assert class_names(table.schema) is None
    reasons = dict(zip(*read_table(result.quarantine_uri).select(["id", "reason"]).to_pydict().values(), strict=True))
    assert reasons == {2: "missing text", 3: "missing text", 4: "text is not a string (int)"}


def test_text_without_labels_and_with_other_column_names(tmp_path):
    rows = [{"doc": 7, "body": "seven", "extra": 1}, {"doc": 9, "body": "nine", "extra": 2}]
    src = _write_text(tmp_path / "docs.txt", rows, "csv")
    out = str(tmp_path / "out")
    import_text(src, out, format="csv", id_column="doc", text_column="body")
    table = read_table(out)
    assert table.column_names == ["id", "text"]
    assert table.to_pydict() == {"id": [7, 9], "text": ["seven", "nine"]}


def test_text_malformed_jsonl_line_is_named_and_nothing_is_written(tmp_path):
    src = tmp_path / "broken.jsonl"
    src.write_text('{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}\n{"id": 3, "text": "c"\n{"id": 4, "text": "d"}\n')
    out = tmp_path / "out"
    with pytest.raises(DatasetImportError, match=r"broken\.jsonl: line 3: not valid JSON"):
        import_text(str(src), str(out))
    assert not out.exists()
    src.write_text('{"id": 1, "text": "a"}\n[1, 2]\n')
    with pytest.raises(DatasetImportError, match=r"broken\.jsonl: line 2: expected a JSON object, found list"):
        import_text(str(src), str(out))


def test_text_missing_id_column_is_an_error_unless_ids_are_assigned(tmp_path):
    rows = [{"text": "first"}, {"text": ""}, {"text": "third"}]
    for fmt, name in (("csv", "t.csv"), ("parquet", "t.parquet")):
        with pytest.raises(DatasetImportError, match=rf"{name}: no column 'id' \(columns: text\); pass assign_ids"):
            import_text(_write_text(tmp_path / name, rows, fmt), str(tmp_path / f"out-{fmt}"))
    src = _write_text(tmp_path / "t.jsonl", rows, "jsonl")
    with pytest.raises(DatasetImportError, match=r"t\.jsonl: line 1: no 'id'; pass assign_ids"):
        import_text(src, str(tmp_path / "out"))
    result = import_text(src, str(tmp_path / "out"), assign_ids=True)
    assert read_table(str(tmp_path / "out")).column("id").to_pylist() == [0, 2]  # the empty row keeps id 1
    assert read_table(result.quarantine_uri).column("id").to_pylist() == [1]


def test_text_duplicate_and_non_integer_ids_name_the_row(tmp_path):
    rows = [{"id": 1, "text": "a"}, {"id": 2, "text": "b"}, {"id": 1, "text": "c"}]
    with pytest.raises(DatasetImportError, match=r"dup\.csv: row 3: duplicate id 1 \(already at row 1\)"):
        import_text(_write_text(tmp_path / "dup.csv", rows, "csv"), str(tmp_path / "o1"))
    with pytest.raises(DatasetImportError, match=r"dup\.jsonl: line 3: duplicate id 1 \(already at line 1\)"):
        import_text(_write_text(tmp_path / "dup.jsonl", rows, "jsonl"), str(tmp_path / "o2"))
    rows[1]["id"] = "2b"
    with pytest.raises(DatasetImportError, match=r"bad\.csv: row 2: 'id' must be an integer, found '2b'"):
        import_text(_write_text(tmp_path / "bad.csv", rows, "csv"), str(tmp_path / "o3"))
    rows[1]["id"] = 2.5
    with pytest.raises(DatasetImportError, match=r"bad\.jsonl: line 2: 'id' must be an integer, found 2\.5"):
        import_text(_write_text(tmp_path / "bad.jsonl", rows, "jsonl"), str(tmp_path / "o4"))


def test_text_label_rules(tmp_path):
    rows = [{"id": 1, "text": "a", "label": "x"}, {"id": 2, "text": "b", "label": ""}]
    with pytest.raises(DatasetImportError, match=r"l\.csv: row 2: no 'label' \(other rows have one"):
        import_text(_write_text(tmp_path / "l.csv", rows, "csv"), str(tmp_path / "o1"))
    rows[1]["label"] = -1
    with pytest.raises(DatasetImportError, match=r"l\.jsonl: line 2: 'label' -1 is not a class index"):
        import_text(_write_text(tmp_path / "l.jsonl", rows, "jsonl"), str(tmp_path / "o2"))
    # A label column nobody filled in is no label column.
    src = tmp_path / "none.csv"
    src.write_text("id,text,label\n1,a,\n2,b,\n")
    import_text(str(src), str(tmp_path / "o3"))
    assert read_table(str(tmp_path / "o3")).column_names == ["id", "text"]


def test_text_limit_shards_and_errors(tmp_path):
    src = _write_text(tmp_path / "t.parquet", TEXT_ROWS, "parquet")
    out = str(tmp_path / "out")
    result = import_text(src, out, limit=2, rows_per_shard=1)
    assert (result.rows, len(list_shards(out))) == (2, 2)
    assert class_names(read_table(out).schema) == ["cat", "dog"]  # the names of the rows imported
    with pytest.raises(ShardExistsError):
        import_text(src, out)
    with pytest.raises(DatasetImportError, match=r"t\.txt: cannot tell the format"):
        import_text(str(tmp_path / "t.txt"), str(tmp_path / "o1"))
    with pytest.raises(DatasetImportError, match=r"missing\.csv: no such file"):
        import_text(str(tmp_path / "missing.csv"), str(tmp_path / "o2"))
    with pytest.raises(DatasetImportError, match=r"t\.parquet: no column 'body'"):
        import_text(src, str(tmp_path / "o3"), text_column="body")
    empty = _write_text(tmp_path / "e.jsonl", [{"id": 1, "text": " "}], "jsonl")
    with pytest.raises(DatasetImportError, match=r"e\.jsonl: none of the 1 rows has a usable 'text'.*empty text"):
        import_text(empty, str(tmp_path / "o4"))
