"""The shared vocabulary: enums are their strings, parse names the valid values, locate_ids finds rows."""

import json

import numpy as np
import pytest

from raybackfill.types import MODEL_METRICS, Metric, Space, Strategy, locate_ids, locate_sorted, parse


def test_members_are_their_strings():
    assert Strategy.RANK_MERGE == "rank_merge"
    assert json.dumps({"s": Strategy.RANK_MERGE}) == '{"s": "rank_merge"}'
    assert f"{Metric.L2}" == "l2"
    assert repr(Strategy.OLD) == "'old'" and str([Space.NEW]) == "['new']"  # messages read as with plain strings


def test_space_codes_round_trip():
    assert [s.code for s in Space] == [0, 1, 2]
    assert all(Space.from_code(s.code) is s for s in Space)


def test_parse_lists_valid_values():
    assert parse(Metric, "cosine") is Metric.COSINE
    with pytest.raises(ValueError, match="unknown strategy 'nope'; valid: old, compatible, rank_merge"):
        parse(Strategy, "nope")


def test_parse_among_a_subset_lists_only_the_subset():
    assert parse(Metric, "l2", among=MODEL_METRICS) is Metric.L2
    with pytest.raises(ValueError, match="unknown metric 'ip'; valid: cosine, l2$"):
        parse(Metric, "ip", among=MODEL_METRICS)


def test_locate_ids_against_brute_force():
    rng = np.random.default_rng(0)
    ids = rng.permutation(1000)[:300] * 7
    wanted = rng.choice(ids, 50)
    brute = np.array([int(np.flatnonzero(ids == w)[0]) for w in wanted])
    assert locate_ids(ids, wanted).tolist() == brute.tolist()


def test_locate_ids_missing():
    ids = np.array([5, 1, 9])
    with pytest.raises(KeyError, match=r"1 id\(s\) not found, e.g. \[4\]"):
        locate_ids(ids, np.array([9, 4]))
    assert locate_ids(ids, np.array([9, 4, 0, 10]), missing="mask").tolist() == [2, -1, -1, -1]
    assert locate_ids(np.array([], dtype=np.int64), np.array([3]), missing="mask").tolist() == [-1]


def test_locate_sorted_takes_any_shape_and_masks_or_raises():
    sorted_ids = np.array([2, 4, 8, 16])
    assert locate_sorted(sorted_ids, np.array([[16, 3], [2, 99]]), missing="mask").tolist() == [[3, -1], [0, -1]]
    assert locate_sorted(sorted_ids, np.array([8, 2])).tolist() == [2, 0]
    with pytest.raises(KeyError, match=r"2 id\(s\) not found, e.g. \[1, 20\]"):
        locate_sorted(sorted_ids, np.array([1, 4, 20]))
    assert locate_sorted(np.array([], dtype=np.int64), np.array([[1, 2]]), missing="mask").tolist() == [[-1, -1]]
