"""The shared vocabulary: enums are their strings, parse names the valid values, locate_ids finds rows."""

import json

import numpy as np
import pytest

from raybackfill.types import Metric, Space, Strategy, locate_ids, parse


def test_members_are_their_strings():
    assert Strategy.RANK_MERGE == "rank_merge"
    assert json.dumps({"s": Strategy.RANK_MERGE}) == '{"s": "rank_merge"}'
    assert f"{Metric.L2}" == "l2"


def test_space_codes_round_trip():
    assert [s.code for s in Space] == [0, 1, 2]
    assert all(Space.from_code(s.code) is s for s in Space)


def test_parse_lists_valid_values():
    assert parse(Metric, "cosine") is Metric.COSINE
    with pytest.raises(ValueError, match="unknown strategy 'nope'; valid: old, compatible, rank_merge"):
        parse(Strategy, "nope")


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
