"""Input checks of the index: clear errors that name what is wrong."""

from __future__ import annotations

import numpy as np
import pytest

from raybackfill.index.validate import as_batch, as_ids, as_queries, as_vectors, check_k, unit_rows


def test_ids_must_be_unique_non_negative_integers():
    np.testing.assert_array_equal(as_ids(np.array([3, 1], dtype=np.int32)), [3, 1])
    assert as_ids([3, 1]).dtype == np.int64
    with pytest.raises(ValueError, match="duplicate ids within one batch: 4, 7"):
        as_ids([4, 7, 4, 7, 1])
    with pytest.raises(ValueError, match="non-negative.*-1"):
        as_ids([1, -1])
    with pytest.raises(ValueError, match="integers"):
        as_ids([1.5, 2.0])
    with pytest.raises(ValueError, match="1-D"):
        as_ids([[1, 2]])


def test_vectors_are_cast_to_float32_and_nan_rows_are_named_by_id():
    out = as_vectors(np.ones((2, 3), dtype=np.float64), 3)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    bad = np.ones((3, 2))
    bad[1, 0] = np.nan
    bad[2, 1] = np.inf
    with pytest.raises(ValueError, match=r"NaN/inf in 2 rows \(ids 11, 12\)"):
        as_batch([10, 11, 12], bad)
    with pytest.raises(ValueError, match="dim 2, expected 3"):
        as_vectors(np.ones((1, 2)), 3)
    with pytest.raises(ValueError, match="2 ids for 3 vectors"):
        as_batch([1, 2], np.ones((3, 2)))
    with pytest.raises(ValueError, match="real numbers"):
        as_vectors(np.array([["a", "b"]]), None)


def test_queries_and_k_have_bounds():
    assert as_queries(np.ones(4), 4, 10, "q").shape == (1, 4)
    with pytest.raises(ValueError, match="q is empty"):
        as_queries(np.ones((0, 4)), 4, 10, "q")
    with pytest.raises(ValueError, match="11 queries, more than the limit of 10"):
        as_queries(np.ones((11, 4)), 4, 10, "q")
    assert check_k(np.int64(5), 5) == 5
    for bad in (0, -1, 6, 2.0, True):
        with pytest.raises(ValueError, match="k must be"):
            check_k(bad, 5)


def test_unit_rows_scale_to_length_one_and_refuse_zero_vectors_by_id():
    out = unit_rows(np.array([[3.0, 4.0], [0.0, -2.0]], dtype=np.float32))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, -1.0]])
    with pytest.raises(ValueError, match="zero vector.*ids 11"):
        unit_rows(np.array([[1.0, 0.0], [0.0, 0.0]]), "vectors", ids=np.array([10, 11]))
