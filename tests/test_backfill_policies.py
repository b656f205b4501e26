"""Backfill priority policies: hand-computed scores, brute-force references, and the deterministic order."""

import math

import numpy as np
import pytest
import torch

from raybackfill.backfill.policies import (
    classifier_log_probs,
    entropy_scores,
    id_scores,
    least_confidence_scores,
    priority_order,
    priority_scores,
    random_scores,
    uncertainty_scores,
)
from raybackfill.models.transformations import FastFillTransformation, ForwardTransformation
from raybackfill.types import Policy

IDENTITY = np.eye(2)


def test_entropy_and_least_confidence_of_two_classes_by_hand():
    # logits (1, 0): p = (e / (e + 1), 1 / (e + 1)) = (0.7310586, 0.2689414)
    p1, p2 = math.e / (math.e + 1), 1 / (math.e + 1)
    old = np.array([[1.0, 0.0]])
    np.testing.assert_allclose(entropy_scores(old, IDENTITY), [-(p1 * math.log(p1) + p2 * math.log(p2))])
    np.testing.assert_allclose(entropy_scores(old, IDENTITY), [0.5822031], atol=1e-7)
    np.testing.assert_allclose(least_confidence_scores(old, IDENTITY), [0.2689414], atol=1e-7)


def test_bias_enters_the_logits():
    # logits (1, 0) + bias (0, 1) = (1, 1): uniform over two classes
    old = np.array([[1.0, 0.0]])
    np.testing.assert_allclose(entropy_scores(old, IDENTITY, np.array([0.0, 1.0])), [math.log(2)])
    np.testing.assert_allclose(least_confidence_scores(old, IDENTITY, np.array([0.0, 1.0])), [0.5])


def test_uniform_softmax_has_the_largest_scores_and_a_sure_one_scores_zero():
    weight = np.ones((5, 3))  # every class gets the same logit: uniform p
    old = np.array([[0.3, -2.0, 7.0]])
    np.testing.assert_allclose(entropy_scores(old, weight), [math.log(5)])
    np.testing.assert_allclose(least_confidence_scores(old, weight), [1 - 1 / 5])
    sure = np.array([[1000.0, 0.0]])  # overflows a naive softmax
    np.testing.assert_allclose(entropy_scores(sure, IDENTITY), [0.0], atol=1e-12)
    np.testing.assert_allclose(least_confidence_scores(sure, IDENTITY), [0.0], atol=1e-12)


def test_classifier_scores_match_a_brute_force_softmax():
    rng = np.random.default_rng(3)
    old, weight, bias = rng.normal(size=(50, 8)), rng.normal(size=(6, 8)), rng.normal(size=6)
    logits = old @ weight.T + bias
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(np.exp(classifier_log_probs(old, weight, bias)), p, rtol=1e-12)
    np.testing.assert_allclose(entropy_scores(old, weight, bias), -(p * np.log(p)).sum(1), rtol=1e-10)
    np.testing.assert_allclose(least_confidence_scores(old, weight, bias), 1 - p.max(1), rtol=1e-10)


def test_classifier_scores_reject_mismatched_or_non_finite_inputs():
    with pytest.raises(ValueError, match=r"weight must be \(classes, 2\)"):
        entropy_scores(np.zeros((3, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="NaN/inf in 1 rows"):
        entropy_scores(np.array([[0.0, np.nan], [0.0, 0.0]]), IDENTITY)


class HeadByHand(torch.nn.Module):
    """(h, s) = (old, 2 * old[:, 0] + side[:, 0]): scores computable by hand."""

    def forward(self, old, side=None):
        s = 2 * old[:, 0] + (0 if side is None else side[:, 0])
        return old, s


def test_uncertainty_is_the_heads_log_variance():
    old = np.array([[1.0, 5.0], [-0.5, 0.0], [3.0, 1.0]], dtype=np.float32)
    side = np.array([[0.25], [1.0], [-4.0]], dtype=np.float32)
    np.testing.assert_allclose(uncertainty_scores(HeadByHand(), old), [2.0, -1.0, 6.0])
    np.testing.assert_allclose(uncertainty_scores(HeadByHand(), old, side), [2.25, 0.0, 2.0])


def test_uncertainty_of_a_fastfill_transformation_uses_eval_mode_and_restores_training_mode():
    torch.manual_seed(0)
    model = FastFillTransformation(old_dim=4, new_dim=3, side_dim=2, hidden_dim=8, mixer_dim=8)
    model.train()
    rng = np.random.default_rng(0)
    old, side = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(5, 2)).astype(np.float32)
    scores = uncertainty_scores(model, old, side)
    assert model.training
    model.eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(old), torch.from_numpy(side))[1].numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    # One item at a time gives the same scores (eval mode: no batch statistics).
    single = [uncertainty_scores(model, old[i : i + 1], side[i : i + 1])[0] for i in range(5)]
    np.testing.assert_allclose(single, expected, rtol=1e-5)


def test_uncertainty_needs_a_head_that_predicts_it():
    model = ForwardTransformation(old_dim=4, new_dim=3, hidden_dim=8, mixer_dim=8)
    with pytest.raises(ValueError, match="FastFill transformation"):
        uncertainty_scores(model, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="3 side-information rows for 2"):
        uncertainty_scores(HeadByHand(), np.zeros((2, 4)), np.zeros((3, 1)))


def test_random_scores_are_splitmix64_of_the_id_and_seed():
    # SplitMix64's first output from state 0 is 0xE220A8397B1DCDAF; with seed 0 and id 0 the key is
    # 0 ^ splitmix64(0), so score(id=0, seed=0) = splitmix64(0xE220A8397B1DCDAF) >> 11 / 2^53.
    mixed = 0xE220A8397B1DCDAF
    state = (mixed + 0x9E3779B97F4A7C15) % 2**64
    state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) % 2**64
    state ^= state >> 31
    assert random_scores(np.array([0]), seed=0)[0] == (state >> 11) / 2**53


def test_random_scores_depend_only_on_id_and_seed():
    ids = np.arange(10_000, dtype=np.int64) * 7 - 3
    scores = random_scores(ids, seed=5)
    perm = np.random.default_rng(0).permutation(len(ids))
    np.testing.assert_array_equal(random_scores(ids[perm], seed=5), scores[perm])
    np.testing.assert_array_equal(random_scores(ids[:10], seed=5), scores[:10])  # any subset alone
    assert not np.array_equal(random_scores(ids, seed=6), scores)
    assert scores.min() >= 0 and scores.max() < 1
    # Uniform: every decile holds about a tenth (binomial sd ~30 of 1000).
    counts = np.bincount((scores * 10).astype(int), minlength=10)
    assert np.abs(counts - 1000).max() < 150
    with pytest.raises(ValueError, match="non-negative"):
        random_scores(ids, seed=-1)


def test_order_is_by_score_descending_then_id_ascending():
    scores = np.array([0.5, 0.9, 0.5, 0.1])
    ids = np.array([7, 3, 2, 9])
    # 0.9 (pos 1), then the 0.5 tie by id: id 2 (pos 2) before id 7 (pos 0), then 0.1 (pos 3)
    np.testing.assert_array_equal(priority_order(scores, ids), [1, 2, 0, 3])


def test_order_matches_a_brute_force_sort_and_ignores_input_row_order():
    rng = np.random.default_rng(1)
    ids = rng.permutation(200).astype(np.int64) * 3
    scores = rng.integers(0, 5, 200).astype(np.float64)  # many ties
    order = priority_order(scores, ids)
    expected = sorted(range(200), key=lambda i: (-scores[i], ids[i]))
    np.testing.assert_array_equal(order, expected)
    perm = rng.permutation(200)
    np.testing.assert_array_equal(ids[perm][priority_order(scores[perm], ids[perm])], ids[order])


def test_id_policy_orders_by_ascending_id_even_beyond_float_precision():
    ids = np.array([5, -1, 2**60 + 1, 3, 2**60, 2**62], dtype=np.int64)
    order = priority_order(id_scores(ids), ids)
    np.testing.assert_array_equal(ids[order], np.sort(ids))


def test_order_rejects_nan_duplicates_and_mismatched_lengths():
    with pytest.raises(ValueError, match="1 priority scores are NaN"):
        priority_order(np.array([0.1, np.nan]), np.array([1, 2]))
    with pytest.raises(ValueError, match="unique"):
        priority_order(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(ValueError, match="one score per id"):
        priority_order(np.array([0.1, 0.2]), np.array([1, 2, 3]))


def test_priority_scores_dispatches_each_policy():
    ids = np.array([10, 11, 12])
    old = np.array([[1.0, 0.0], [0.0, 0.0], [3.0, 1.0]])
    inputs = {"old": old, "classifier": (IDENTITY, None), "transformation": HeadByHand(), "seed": 4}
    expected = {
        "uncertainty": 2 * old[:, 0],
        "entropy": entropy_scores(old, IDENTITY),
        "least_confidence": least_confidence_scores(old, IDENTITY),
        "random": random_scores(ids, 4),
        "id": -ids.astype(float),
    }
    assert set(expected) == set(Policy)
    for policy, values in expected.items():
        np.testing.assert_allclose(priority_scores(policy, ids, **inputs), values)


def test_priority_scores_say_what_a_policy_is_missing():
    ids = np.array([1, 2])
    with pytest.raises(ValueError, match="needs one old embedding per id"):
        priority_scores("entropy", ids, classifier=(IDENTITY, None))
    with pytest.raises(ValueError, match="needs the old classifier"):
        priority_scores("least_confidence", ids, old=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="needs the FastFill transformation"):
        priority_scores("uncertainty", ids, old=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="unknown policy 'fifo'"):
        priority_scores("fifo", ids)
