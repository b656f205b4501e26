"""Research diagnostics of an uncertainty head: rank agreement with its true error, and the oracle order."""

import numpy as np
import pytest
import torch

from raybackfill.data.schema import embedding_table
from raybackfill.eval.diagnostics import ORACLE_LOSS, ORACLE_ORDER, spearman, uncertainty_agreement, with_oracle_loss
from raybackfill.eval.offline import Embeddings, Order


def test_spearman_is_the_correlation_of_ranks():
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 200.0, 3000.0])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1.0)


def test_the_oracle_order_reads_the_oracle_loss_column():
    assert Order.parse(f"column:{ORACLE_LOSS}") == ORACLE_ORDER and str(ORACLE_ORDER) == "column:oracle_loss"


def test_uncertainty_agreement_tells_norm_error_from_angular_error():
    # Item 0 is only too short (MSE 2, angle 0), item 1 points elsewhere (MSE 0.4, 1 - cos 0.4), item 2 is
    # almost right (MSE 0.02, 1 - cos 0.005). Scores that follow the norm error rank MSE perfectly, but the
    # angular ranks (0, 2, 1) against the score ranks (2, 1, 0) give Spearman -0.5, and so do the ranks of
    # |h| (2, 1, 2.01: ranks 1, 0, 2).
    new = np.array([[4.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    transformed = np.array([[2.0, 0.0], [0.6, 0.8], [2.0, 0.2]])
    agreement = uncertainty_agreement(np.array([3.0, 2.0, 1.0]), transformed, new)
    assert agreement == pytest.approx({"": 1.0, "_angular": -0.5, "_norm": -0.5})


def test_uncertainty_agreement_sees_scores_that_follow_the_norm_of_h():
    # Same directions as the new vectors, so every angular error is 0; the scores rank exactly by |h|.
    new = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    transformed = new * np.array([[0.5], [3.0], [1.0]])
    agreement = uncertainty_agreement(np.array([0.1, 0.9, 0.4]), transformed, new)
    assert agreement["_norm"] == pytest.approx(1.0)


def test_oracle_loss_column_is_each_items_true_fastfill_error():
    rng = np.random.default_rng(0)
    ids = np.arange(10, 16)
    old, transformed, new = (rng.normal(size=(6, 3)).astype(np.float32) for _ in range(3))
    labels = rng.integers(0, 4, size=6)
    classifier = torch.nn.Linear(3, 4)
    gallery = with_oracle_loss(Embeddings(ids, old, embedding_table(ids, old)), transformed, new, labels, classifier)
    weight, bias = classifier.weight.detach().numpy(), classifier.bias.detach().numpy()
    logits = transformed @ weight.T + bias
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    smoothed_ce = -(0.9 * log_p[np.arange(6), labels] + 0.1 * log_p.mean(1))
    expected = ((new - transformed) ** 2).mean(1) + smoothed_ce
    assert gallery.table.column("oracle_loss").to_numpy() == pytest.approx(expected, rel=1e-5)
    assert np.array_equal(gallery.ids, ids) and gallery.vectors is old
