from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from raybackfill.data.info import class_names, with_class_names
from raybackfill.data.schema import SchemaError, image_table
from raybackfill.data.splits import holdout, parse_class_spec, parse_fractions, split_table, write_splits
from raybackfill.data.storage import read_table


def _table(classes: int = 4, per_class: int = 10) -> pa.Table:
    ids = np.arange(classes * per_class) * 3 + 100  # ids unrelated to row positions
    labels = np.arange(classes * per_class) % classes
    table = image_table(ids, [b"img%d" % i for i in ids], labels)
    return with_class_names(table, [f"class{c}" for c in range(classes)])


def _ids(table: pa.Table) -> list[int]:
    return table.column("id").to_pylist()


# ------------------------------------------------------------------------------------------ class specs


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("0-4", [0, 1, 2, 3, 4]), ("0,1,5-9", [0, 1, 5, 6, 7, 8, 9]), (" 7 , 3,3 ", [3, 7]), ("2-2", [2])],
)
def test_parse_class_spec_ranges_and_lists(spec, expected):
    assert parse_class_spec(spec).tolist() == expected


def test_parse_class_spec_half_is_the_lower_half_of_present_classes():
    assert parse_class_spec("half", np.array([9, 3, 5, 3, 1, 7])).tolist() == [1, 3]
    assert parse_class_spec("HALF", np.arange(100)).tolist() == list(range(50))


@pytest.mark.parametrize("spec", ["5-3", "a", "", "1-", "-1", "1,,2", "0-4x"])
def test_parse_class_spec_rejects_bad_syntax(spec):
    with pytest.raises(ValueError, match="class spec"):
        parse_class_spec(spec)


def test_parse_class_spec_rejects_classes_not_in_the_table():
    with pytest.raises(ValueError, match="not in the table: 10, 11"):
        parse_class_spec("8-11", np.arange(10))


_NAMES = ["disk-dots-hue000", "ring-dots-hue030", "disk-stripes-hue210", "cat"]


def test_named_spec_takes_classes_with_a_listed_word_or_whole_name():
    assert parse_class_spec("named:hue000,hue030", names=_NAMES).tolist() == [0, 1]
    assert parse_class_spec("named: DISK ", names=_NAMES).tolist() == [0, 2]
    assert parse_class_spec("named:cat,dots", names=_NAMES).tolist() == [0, 1, 3]
    assert parse_class_spec("named:disk", np.array([2, 3, 2]), names=_NAMES).tolist() == [2]


def test_named_spec_does_not_match_inside_a_word():
    with pytest.raises(ValueError, match="no class name has the word"):
        parse_class_spec("named:dis", names=_NAMES)


@pytest.mark.parametrize(
    ("spec", "names", "message"),
    [
        ("named:", _NAMES, "without empty words"),
        ("named:disk,,ring", _NAMES, "without empty words"),
        ("named:disk", None, "needs class names"),
        ("named:disk,hexagon,dog", _NAMES, "no class name has the word.s. hexagon, dog"),
    ],
)
def test_named_spec_rejects_empty_words_missing_names_and_unknown_words(spec, names, message):
    with pytest.raises(ValueError, match=message):
        parse_class_spec(spec, names=names)


def test_named_spec_only_sees_the_classes_present():
    with pytest.raises(ValueError, match="no class name has the word.s. cat"):
        parse_class_spec("named:cat", np.array([0, 1, 2]), names=_NAMES)


def test_parse_fractions():
    assert parse_fractions("train=0.6,gallery=0.3,query=0.1") == {"train": 0.6, "gallery": 0.3, "query": 0.1}
    for bad, message in [
        ("train=0.6,gallery=0.3", "sum to 1"),
        ("train=0.5,train=0.5", "given twice"),
        ("train", "NAME=FRACTION"),
        ("train=x,b=1", "not a number"),
        ("a/b=1", "bad split name"),
        ("a=1.5,b=-0.5", "must be in"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_fractions(bad)


# ----------------------------------------------------------------------------------------------- splits


def test_each_class_is_split_by_its_fractions():
    splits = split_table(_table(classes=4, per_class=10), {"train": 0.6, "gallery": 0.3, "query": 0.1})
    for name, per_class in (("train", 6), ("gallery", 3), ("query", 1)):
        labels, counts = np.unique(splits[name].column("label").to_numpy(), return_counts=True)
        assert labels.tolist() == [0, 1, 2, 3]
        assert counts.tolist() == [per_class] * 4


def test_splits_partition_the_rows():
    table = _table(classes=3, per_class=7)
    splits = split_table(table, {"a": 0.5, "b": 0.25, "c": 0.25}, seed=5)
    all_ids = [i for s in splits.values() for i in _ids(s)]
    assert sorted(all_ids) == sorted(_ids(table))
    assert len(set(all_ids)) == len(all_ids)


def test_a_table_sorted_by_class_is_written_in_a_shuffled_order():
    # What an ImageFolder import looks like: ids numbered class after class.
    labels = np.repeat(np.arange(5), 40)
    table = image_table(np.arange(200), [b"x"] * 200, labels)
    train = split_table(table, {"train": 0.8, "query": 0.2}, seed=0)["train"]
    written = train.column("label").to_numpy()
    # Sorted by class, 160 rows of 5 classes change label 4 times; a random order changes it ~128 times.
    assert np.count_nonzero(np.diff(written)) > 100
    assert _ids(train) != sorted(_ids(train))
    assert split_table(table, {"train": 0.8, "query": 0.2}, seed=0)["train"].equals(train)  # seeded


def test_same_seed_same_split_regardless_of_row_order():
    table = _table()
    shuffled = table.take(pa.array(np.random.default_rng(0).permutation(table.num_rows)))
    first = split_table(table, seed=7)
    again = split_table(shuffled, seed=7)
    for name in first:
        assert first[name].equals(again[name])


def test_different_seed_different_split():
    table = _table(per_class=20)
    assert _ids(split_table(table, seed=1)["query"]) != _ids(split_table(table, seed=2)["query"])


def test_a_class_split_does_not_depend_on_other_classes():
    table = _table(classes=4, per_class=10)
    subset = table.filter(pc.less(table.column("label"), 2))
    full = split_table(table, seed=3)["gallery"]
    part = split_table(subset, seed=3)["gallery"]
    assert sorted(_ids(full.filter(pc.less(full.column("label"), 2)))) == sorted(_ids(part))


def test_train_old_holds_the_train_rows_of_the_old_classes():
    table = _table(classes=4, per_class=10)
    splits = split_table(table, old_classes="0,2", seed=0)
    assert list(splits) == ["train", "gallery", "query", "train_old"]
    old = splits["train_old"]
    assert sorted(set(old.column("label").to_pylist())) == [0, 2]
    train = splits["train"]
    expected = [i for i, y in zip(_ids(train), train.column("label").to_pylist(), strict=True) if y in (0, 2)]
    assert _ids(old) == expected
    half = split_table(table, old_classes="half", seed=0)["train_old"]
    assert sorted(set(half.column("label").to_pylist())) == [0, 1]
    with pytest.raises(ValueError, match="needs a 'train' split"):
        split_table(table, {"fit": 0.5, "eval": 0.5}, old_classes="0")


def test_train_old_by_class_name_words_reads_the_table_class_names():
    table = with_class_names(_table(classes=4, per_class=10), ["a-red", "b-blue", "c-red", "d-green"])
    old = split_table(table, old_classes="named:red", seed=0)["train_old"]
    assert sorted(set(old.column("label").to_pylist())) == [0, 2]
    unnamed = table.replace_schema_metadata(None)
    with pytest.raises(ValueError, match="needs class names"):
        split_table(unnamed, old_classes="named:red", seed=0)


def test_splits_keep_columns_and_class_names():
    splits = split_table(_table(), seed=0)
    for split in splits.values():
        assert split.schema.names == ["id", "image", "label"]
        assert class_names(split.schema) == ["class0", "class1", "class2", "class3"]
        for image_id, image in zip(_ids(split), split.column("image").to_pylist(), strict=True):
            assert image == b"img%d" % image_id


def test_split_needs_unique_ids_and_labels():
    table = _table()
    with pytest.raises(SchemaError, match="missing column 'label'"):
        split_table(table.drop_columns(["label"]), source="src")
    duplicated = pa.concat_tables([table, table.slice(0, 1)])
    with pytest.raises(SchemaError, match="duplicate ids"):
        split_table(duplicated)


def test_write_splits_writes_one_table_per_split(tmp_path):
    splits = split_table(_table(), old_classes="0-1", seed=0)
    out = str(tmp_path / "splits")
    results = write_splits(splits, out, rows_per_shard=5)
    for name, split in splits.items():
        assert results[name].uri == str(tmp_path / "splits" / name)
        assert read_table(results[name].uri).equals(split)
    assert len(results["train"].shards) == 5  # 24 rows, 5 per shard


# ----------------------------------------------------------------------------------------------- holdout


def test_holdout_takes_its_fraction_of_every_class_rounded():
    labels = np.array([0] * 10 + [1] * 25 + [2] * 1)
    ids = np.arange(36) * 7
    mask = holdout(ids, labels, 0.2, seed=0)
    # round(0.2 x 10) = 2, round(0.2 x 25) = 5, and a class of one row keeps it for training
    assert [int(mask[labels == c].sum()) for c in (0, 1, 2)] == [2, 5, 0]


def test_holdout_does_not_depend_on_row_order_and_changes_with_the_seed():
    rng = np.random.default_rng(1)
    ids, labels = np.arange(300) + 1000, rng.integers(0, 6, 300)
    order = rng.permutation(300)
    mask = holdout(ids, labels, 0.1, seed=4)
    assert np.array_equal(holdout(ids[order], labels[order], 0.1, seed=4), mask[order])
    assert not np.array_equal(holdout(ids, labels, 0.1, seed=5), mask)


def test_holdout_caps_the_rows_and_works_without_labels():
    ids = np.arange(1000)
    assert holdout(ids, None, 0.1, seed=0).sum() == 100
    assert holdout(ids, None, 0.1, max_rows=30, seed=0).sum() == 30
    assert holdout(ids, None, 0.0, seed=0).sum() == 0
    with pytest.raises(ValueError, match="fraction"):
        holdout(ids, None, 1.0)
