from __future__ import annotations

import numpy as np
import pytest

from raybackfill.data.images import decode_rgb
from raybackfill.data.info import class_names
from raybackfill.data.schema import validate_image_table
from raybackfill.data.storage import list_shards, read_table
from raybackfill.data.synth import (
    SHAPES,
    TEXTURES,
    attribute_space,
    class_attributes,
    render,
    synthesize,
    write_synthetic,
)


@pytest.fixture(scope="module")
def small():
    return synthesize(classes=6, per_class=4, size=24, seed=3)


def test_same_seed_gives_identical_bytes(small):
    again = synthesize(classes=6, per_class=4, size=24, seed=3)
    assert again.equals(small)
    assert again.column("image").to_pylist() == small.column("image").to_pylist()


def test_different_seed_gives_different_images(small):
    other = synthesize(classes=6, per_class=4, size=24, seed=4)
    same = [a == b for a, b in zip(small.column("image").to_pylist(), other.column("image").to_pylist(), strict=True)]
    assert not any(same)


def test_table_validates_as_image_table_with_ordered_ids(small):
    table = validate_image_table(small, "synth", require_label=True)
    ids = table.column("id").to_numpy()
    assert ids.tolist() == list(range(24))
    assert table.column("label").to_numpy().tolist() == (ids % 6).tolist()
    assert str(table.schema.field("label").type) == "int32"


def test_every_class_has_per_class_images(small):
    labels, counts = np.unique(small.column("label").to_numpy(), return_counts=True)
    assert labels.tolist() == list(range(6))
    assert counts.tolist() == [4] * 6


def test_images_decode_to_size_by_size_rgb(small):
    for data in small.column("image").to_pylist():
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert decode_rgb(data).shape == (24, 24, 3)


def test_any_subset_of_ids_renders_the_same_pixels_as_the_full_table(small):
    attrs = class_attributes(6, seed=3)
    ids = np.array([17, 2, 9])
    pixels = render(ids, ids % 6, attrs, 24, seed=3)
    full = small.column("image").to_pylist()
    for image_id, img in zip(ids, pixels, strict=True):
        np.testing.assert_array_equal(img, decode_rgb(full[image_id]))


def test_images_vary_within_a_class(small):
    pixels = np.stack([decode_rgb(b) for b in small.column("image").to_pylist()]).astype(np.float32)
    same_class = pixels[np.arange(24) % 6 == 0]
    assert np.abs(same_class[0] - same_class[1]).mean() > 10.0


def test_classes_are_distinct_attribute_combinations_sharing_attributes():
    attrs = class_attributes(100, seed=0)
    combos = set(zip(attrs.shape, attrs.texture, attrs.hue, attrs.scheme, strict=True))
    assert len(combos) == 100
    # Every shape appears in several classes, so shape alone never identifies a class.
    assert np.bincount(attrs.shape, minlength=len(SHAPES)).min() >= 2
    assert set(attrs.texture.tolist()) == set(range(len(TEXTURES)))


def test_class_names_are_stored_in_the_schema(small):
    names = class_names(small.schema)
    attrs = class_attributes(6, seed=3)
    assert names == [attrs.name(c) for c in range(6)]
    assert len(set(names)) == 6


def test_too_many_classes_or_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="classes must be in 1.."):
        class_attributes(attribute_space() + 1)
    with pytest.raises(ValueError, match="per_class"):
        synthesize(classes=2, per_class=0)
    with pytest.raises(ValueError, match="seed"):
        synthesize(classes=2, per_class=1, seed=-1)


def test_write_synthetic_writes_shards_that_read_back(tmp_path):
    out = str(tmp_path / "synth")
    result = write_synthetic(out, classes=5, per_class=4, size=16, seed=1, rows_per_shard=8)
    assert result.rows == 20
    assert len(list_shards(out)) == 3
    back = read_table(out)
    assert back.equals(synthesize(classes=5, per_class=4, size=16, seed=1))
    assert class_names(back.schema) == [class_attributes(5, seed=1).name(c) for c in range(5)]
