from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from raybackfill.data.images import decode_rgb, encode_png
from raybackfill.data.importers import (
    DatasetImportError,
    import_cifar,
    import_idx,
    import_image_folder,
    load_cifar_pickle,
    read_idx,
)
from raybackfill.data.info import class_names
from raybackfill.data.io import list_shards, read_table
from raybackfill.data.schema import validate_image_table


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


def test_image_folder_labels_follow_sorted_class_names(folder, tmp_path):
    out = str(tmp_path / "out")
    result = import_image_folder(str(folder), out)
    table = validate_image_table(read_table(out), out, require_label=True)
    assert result.rows == 4
    assert table.column("id").to_pylist() == [0, 1, 2, 3]
    assert table.column("path").to_pylist() == ["cats/img0.png", "cats/img1.png", "dogs/img0.png", "dogs/img1.png"]
    assert table.column("label").to_pylist() == [0, 0, 1, 1]
    assert class_names(table.schema) == ["cats", "dogs"]


def test_image_folder_keeps_png_bytes_unchanged(folder, tmp_path):
    out = str(tmp_path / "out")
    import_image_folder(str(folder), out)
    table = read_table(out)
    for rel, data in zip(table.column("path").to_pylist(), table.column("image").to_pylist(), strict=True):
        assert data == (folder / rel).read_bytes()


def test_image_folder_resizes_and_converts_other_formats_to_png(folder, tmp_path):
    Image.fromarray(_pixels(5, h=10, w=20)).save(folder / "dogs" / "wide.bmp")
    out = str(tmp_path / "out")
    import_image_folder(str(folder), out, size=4)
    table = read_table(out)
    assert "dogs/wide.bmp" in table.column("path").to_pylist()
    for data in table.column("image").to_pylist():
        assert data[:4] == b"\x89PNG"
        assert decode_rgb(data).shape == (4, 4, 3)


def test_image_folder_limit_and_shards(folder, tmp_path):
    out = str(tmp_path / "out")
    result = import_image_folder(str(folder), out, limit=3, rows_per_shard=2)
    assert result.rows == 3
    assert len(list_shards(out)) == 2
    assert read_table(out).column("id").to_pylist() == [0, 1, 2]


def test_image_folder_names_the_unreadable_file(folder, tmp_path):
    (folder / "dogs" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetImportError, match=r"dogs/broken\.png: not a readable image"):
        import_image_folder(str(folder), str(tmp_path / "out"))


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
