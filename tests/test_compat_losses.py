"""Compat losses against hand-computed values on tiny tensors and against plain-loop numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raybackfill.compat.losses import (
    bct_influence_loss,
    classification_loss,
    fastfill_item_loss,
    fastfill_loss,
    fct_loss,
    metric_compatible_loss,
    nt_xent_loss,
    ract_loss,
    synthesize_old_classifier,
)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def log_softmax_row(row: np.ndarray) -> np.ndarray:
    m = row.max()
    return row - (m + math.log(sum(math.exp(v - m) for v in row)))


def ce_loop(logits: np.ndarray, labels: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """Per-item cross-entropy with label smoothing, one item at a time."""
    out = []
    for row, y in zip(logits, labels, strict=True):
        logp = log_softmax_row(row)
        classes = len(row)
        out.append(-sum(((1 - eps) * (c == y) + eps / classes) * logp[c] for c in range(classes)))
    return np.array(out)


# ---- classification / BCT ---------------------------------------------------------------------------


def test_classification_loss_matches_hand_computed_cross_entropy():
    logits, labels = t([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    assert classification_loss(logits, labels).item() == pytest.approx(expected, abs=1e-12)


def test_classification_loss_label_smoothing_spreads_eps_over_classes():
    logits, labels = t([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    # targets: 0.9 on the label, 0.1 on the other class (eps=0.2 spread over 2 classes)
    p0 = math.exp(2) / (math.exp(2) + 1)
    p1 = math.exp(1) / (math.exp(1) + 1)
    row0 = -(0.9 * math.log(p0) + 0.1 * math.log(1 - p0))
    row1 = -(0.9 * math.log(p1) + 0.1 * math.log(1 - p1))
    got = classification_loss(logits, labels, label_smoothing=0.2).item()
    assert got == pytest.approx((row0 + row1) / 2, abs=1e-12)


def test_bct_influence_loss_is_cross_entropy_through_old_classifier():
    features = t([[1.0, 2.0], [-1.0, 0.5]])
    weight = t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    bias = t([0.0, 0.5, -1.0])
    labels = torch.tensor([2, 0])
    # logits row 0: [1, 2.5, 2]; row 1: [-1, 1.0, -1.5]
    expected = (ce_loop(np.array([[1, 2.5, 2.0]]), [2])[0] + ce_loop(np.array([[-1, 1.0, -1.5]]), [0])[0]) / 2
    assert bct_influence_loss(features, labels, weight, bias).item() == pytest.approx(expected, abs=1e-12)


def test_bct_influence_loss_trains_features_never_the_frozen_old_classifier():
    features = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(5, 3, requires_grad=True)
    bias = torch.randn(5, requires_grad=True)
    bct_influence_loss(features, torch.tensor([0, 1, 4, 2]), weight, bias).backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    assert weight.grad is None and bias.grad is None


def test_bct_influence_loss_rejects_labels_without_old_classifier_row():
    with pytest.raises(ValueError, match="synthesize"):
        bct_influence_loss(torch.randn(2, 3), torch.tensor([0, 3]), torch.randn(3, 3), None)


def test_synthesized_old_classifier_rows_are_class_means_at_the_trained_rows_norm():
    old_weight, old_bias = t([[3.0, 4.0], [0.0, 15.0]]), t([0.5, -0.5])  # row norms 5 and 15: mean 10
    old_features = t([[0.0, 0.0], [1.0, 3.0], [5.0, 3.0], [-2.0, 0.0], [9.0, 9.0]])
    labels = torch.tensor([0, 2, 2, 3, 1])
    weight, bias = synthesize_old_classifier(old_weight, old_bias, old_features, labels, num_classes_new=4)
    # class 2: mean (3, 3) -> 10 * (3, 3) / (3 * sqrt 2); class 3: mean (-2, 0) -> (-10, 0)
    expected = [[3.0, 4.0], [0.0, 15.0], [10 / 2**0.5, 10 / 2**0.5], [-10.0, 0.0]]
    assert torch.allclose(weight, t(expected))
    assert bias.tolist() == [0.5, -0.5, 0.0, 0.0]
    assert not weight.requires_grad and not bias.requires_grad


def test_synthesize_old_classifier_names_new_classes_without_examples():
    with pytest.raises(ValueError, match=r"new classes \[3\]"):
        synthesize_old_classifier(torch.zeros(2, 2), None, torch.ones(3, 2), torch.tensor([0, 2, 1]), 4)


# ---- RACT ---------------------------------------------------------------------------------------------


def ract_loop(new: np.ndarray, old: np.ndarray, labels: np.ndarray, tau: float, k: int) -> float:
    n, o = unit(new), unit(old)
    total = 0.0
    for i in range(len(n)):
        negatives = [j for j in range(len(n)) if labels[j] != labels[i]]
        to_old = sorted((float(n[i] @ o[j]) for j in negatives), reverse=True)[:k]
        to_new = sorted((float(n[i] @ n[j]) for j in negatives), reverse=True)[:k]
        pos = float(n[i] @ o[i])
        denominator = math.exp(pos / tau) + sum(math.exp(s / tau) for s in to_old + to_new)
        total += -math.log(math.exp(pos / tau) / denominator)
    return total / len(n)


def test_ract_loss_matches_hand_computed_value():
    # unit vectors scaled by 2 and 3: the loss must normalise them
    new = 2 * t([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    old = 3 * t([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    tau, e = 0.5, math.exp
    # i=0: pos n0.o0=0.8; negatives j=2: n0.o2=1, n0.n2=0.6
    l0 = -math.log(e(1.6) / (e(1.6) + e(2.0) + e(1.2)))
    # i=1: pos 1; n1.o2=0, n1.n2=0.8
    l1 = -math.log(e(2.0) / (e(2.0) + e(0.0) + e(1.6)))
    # i=2: pos 0.6; hardest-1 of n2.o0=0.96, n2.o1=0.8 and of n2.n0=0.6, n2.n1=0.8
    l2 = -math.log(e(1.2) / (e(1.2) + e(1.92) + e(1.6)))
    got = ract_loss(new, old, labels, tau=tau, k=1).item()
    assert got == pytest.approx((l0 + l1 + l2) / 3, abs=1e-10)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_ract_loss_matches_loop_reference(k):
    rng = np.random.default_rng(0)
    new, old = rng.normal(size=(12, 5)), rng.normal(size=(12, 5))
    labels = rng.integers(0, 4, size=12)
    got = ract_loss(t(new), t(old), torch.tensor(labels), tau=0.1, k=k).item()
    assert got == pytest.approx(ract_loop(new, old, labels, 0.1, k), rel=1e-10)


def test_ract_loss_keeps_old_features_frozen():
    new = torch.randn(6, 4, requires_grad=True)
    old = torch.randn(6, 4, requires_grad=True)
    ract_loss(new, old, torch.tensor([0, 0, 1, 1, 2, 2])).backward()
    assert old.grad is None
    assert new.grad is not None and torch.isfinite(new.grad).all() and new.grad.abs().sum() > 0


def test_ract_loss_with_one_class_only_has_no_negatives_and_is_zero():
    loss = ract_loss(torch.randn(3, 4), torch.randn(3, 4), torch.tensor([1, 1, 1]))
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


# ---- FCT / FastFill -------------------------------------------------------------------------------------


def test_fct_loss_is_mean_squared_error_and_target_is_frozen():
    target = t([[1.0, 2.0], [0.0, -1.0]]).requires_grad_()
    h = t([[0.0, 0.0], [0.0, 1.0]]).requires_grad_()
    loss = fct_loss(target, h)
    assert loss.item() == pytest.approx((1 + 4 + 0 + 4) / 4)
    loss.backward()
    assert target.grad is None and h.grad is not None


def fastfill_loop(h, s, target, labels, weight, bias, eps) -> float:
    logits = h @ weight.T + bias
    ce = ce_loop(logits, labels, eps)
    total = 0.0
    for i in range(len(h)):
        per_item = float(np.mean((target[i] - h[i]) ** 2)) + ce[i]
        total += 0.5 * math.exp(-s[i]) * per_item + 0.5 * s[i]
    return total / len(h)


def test_fastfill_loss_matches_hand_computed_value():
    h = t([[1.0, 0.0], [0.0, 0.0]])
    target = t([[1.0, 2.0], [0.0, 1.0]])
    s = t([0.0, math.log(2.0)])
    weight, bias = t([[1.0, 0.0], [0.0, 1.0]]), t([0.0, 0.0])
    p0 = math.e / (math.e + 1)
    l0 = 2.0 - (0.95 * math.log(p0) + 0.05 * math.log(1 - p0))  # mse 4/2, CE with eps 0.1 over 2 classes
    l1 = 0.5 + math.log(2.0)  # mse 1/2, uniform logits
    expected = ((0.5 * l0 + 0.0) + (0.5 * 0.5 * l1 + 0.5 * math.log(2.0))) / 2
    got = fastfill_loss(h, s, target, torch.tensor([0, 1]), weight, bias).item()
    assert got == pytest.approx(expected, abs=1e-12)


def test_fastfill_item_loss_is_mse_plus_smoothed_ce_per_item():
    h = t([[1.0, 0.0], [0.0, 0.0]])
    target = t([[1.0, 2.0], [0.0, 1.0]])
    weight, bias = t([[1.0, 0.0], [0.0, 1.0]]), t([0.0, 0.0])
    p0 = math.e / (math.e + 1)
    expected = [2.0 - (0.95 * math.log(p0) + 0.05 * math.log(1 - p0)), 0.5 + math.log(2.0)]
    got = fastfill_item_loss(h, target, torch.tensor([0, 1]), weight, bias)
    assert got.tolist() == pytest.approx(expected, abs=1e-12)


def test_fastfill_loss_matches_loop_reference_and_accepts_column_uncertainty():
    rng = np.random.default_rng(1)
    h, target = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    s, weight, bias = rng.normal(size=5), rng.normal(size=(4, 3)), rng.normal(size=4)
    labels = rng.integers(0, 4, size=5)
    expected = fastfill_loop(h, s, target, labels, weight, bias, 0.1)
    got = fastfill_loss(t(h), t(s).reshape(5, 1), t(target), torch.tensor(labels), t(weight), t(bias))
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_fastfill_loss_trains_h_and_s_not_the_frozen_classifier_or_target():
    h = torch.randn(3, 4, requires_grad=True)
    s = torch.randn(3, requires_grad=True)
    target = torch.randn(3, 4, requires_grad=True)
    weight, bias = torch.randn(2, 4, requires_grad=True), torch.randn(2, requires_grad=True)
    fastfill_loss(h, s, target, torch.tensor([0, 1, 1]), weight, bias).backward()
    assert h.grad is not None and s.grad is not None
    assert target.grad is None and weight.grad is None and bias.grad is None


def test_fastfill_uncertainty_optimum_is_log_of_item_loss():
    # d/ds [0.5 e^{-s} L + 0.5 s] = 0 at s = log L: the head learns the log of each item's error
    h, target = t([[0.0, 0.0]]), t([[2.0, 2.0]])
    weight, bias = t([[1.0, 0.0], [0.0, 1.0]]), t([0.0, 0.0])
    item_loss = 4.0 + math.log(2.0)
    s = torch.tensor([math.log(item_loss)], dtype=torch.float64, requires_grad=True)
    fastfill_loss(h, s, target, torch.tensor([0]), weight, bias, label_smoothing=0.0).backward()
    assert s.grad.item() == pytest.approx(0.0, abs=1e-12)


# ---- metric-compatible (reverse transformation) -----------------------------------------------------


def metric_compatible_loop(psi_new, old, new, labels, tau) -> float:
    p, o, n = unit(psi_new), unit(old), unit(new)
    total = 0.0
    for i in range(len(p)):
        candidates = []  # (score, is_positive)
        for j in range(len(p)):
            candidates.append((float(p[i] @ o[j]) / tau, labels[j] == labels[i]))
            if j != i:
                candidates.append((float(n[i] @ n[j]) / tau, labels[j] == labels[i]))
                candidates.append((float(p[i] @ p[j]) / tau, labels[j] == labels[i]))
        log_z = math.log(sum(math.exp(s) for s, _ in candidates))
        positives = [s for s, pos in candidates if pos]
        total += -sum(s - log_z for s in positives) / len(positives)
    return total / len(p)


def test_metric_compatible_loss_matches_hand_computed_value_distinct_labels():
    psi_new, old = t([[1.0, 0.0], [0.0, 1.0]]), t([[1.0, 0.0], [0.6, 0.8]])
    new = t([[0.0, 1.0], [0.8, 0.6]])
    e = math.exp
    # i=0: a00=1 (positive), a01=0.6, b01=n0.n1=0.6, c01=p0.p1=0
    l0 = -(1.0 - math.log(e(1.0) + e(0.6) + e(0.6) + e(0.0)))
    # i=1: a10=0, a11=0.8 (positive), b10=0.6, c10=0
    l1 = -(0.8 - math.log(e(0.0) + e(0.8) + e(0.6) + e(0.0)))
    got = metric_compatible_loss(psi_new, old, new, torch.tensor([0, 1]), tau=1.0).item()
    assert got == pytest.approx((l0 + l1) / 2, abs=1e-12)


def test_metric_compatible_loss_averages_over_positives_from_both_spaces():
    psi_new, old = t([[1.0, 0.0], [0.0, 1.0]]), t([[1.0, 0.0], [0.6, 0.8]])
    new = t([[0.0, 1.0], [0.8, 0.6]])
    e = math.exp
    # same label: every candidate is a positive (a00, a01, b01, c01 for i=0; a10, a11, b10, c10 for i=1)
    l0 = math.log(e(1.0) + e(0.6) + e(0.6) + e(0.0)) - (1.0 + 0.6 + 0.6 + 0.0) / 4
    l1 = math.log(e(0.0) + e(0.8) + e(0.6) + e(0.0)) - (0.0 + 0.8 + 0.6 + 0.0) / 4
    got = metric_compatible_loss(psi_new, old, new, torch.tensor([3, 3]), tau=1.0).item()
    assert got == pytest.approx((l0 + l1) / 2, abs=1e-12)


def test_metric_compatible_loss_matches_loop_reference():
    rng = np.random.default_rng(2)
    psi_new, old, new = rng.normal(size=(9, 4)), rng.normal(size=(9, 4)), rng.normal(size=(9, 4))
    labels = rng.integers(0, 3, size=9)
    got = metric_compatible_loss(t(psi_new), t(old), t(new), torch.tensor(labels), tau=0.2).item()
    assert got == pytest.approx(metric_compatible_loop(psi_new, old, new, labels, 0.2), rel=1e-10)


def test_metric_compatible_loss_trains_psi_and_new_but_not_old():
    psi_new = torch.randn(5, 3, requires_grad=True)
    old = torch.randn(5, 3, requires_grad=True)
    new = torch.randn(5, 4, requires_grad=True)
    metric_compatible_loss(psi_new, old, new, torch.tensor([0, 1, 0, 2, 1])).backward()
    assert old.grad is None
    assert torch.isfinite(psi_new.grad).all() and psi_new.grad.abs().sum() > 0
    assert torch.isfinite(new.grad).all() and new.grad.abs().sum() > 0


# ---- NT-Xent ------------------------------------------------------------------------------------------


def nt_xent_loop(z1, z2, tau) -> float:
    z = unit(np.concatenate([z1, z2]))
    count = len(z1)
    total = 0.0
    for a in range(2 * count):
        b = (a + count) % (2 * count)
        log_z = math.log(sum(math.exp(float(z[a] @ z[m]) / tau) for m in range(2 * count) if m != a))
        total += -(float(z[a] @ z[b]) / tau - log_z)
    return total / (2 * count)


def test_nt_xent_matches_hand_computed_value():
    z1, z2 = t([[1.0, 0.0], [0.0, 1.0]]), t([[0.6, 0.8], [0.0, 1.0]])
    e = math.exp
    rows = [
        -0.6 + math.log(e(0.6) + e(0.0) + e(0.0)),  # a=(1,0): partner c; others b, d
        -1.0 + math.log(e(0.0) + e(0.8) + e(1.0)),  # b=(0,1): partner d; others a, c
        -0.6 + math.log(e(0.6) + e(0.8) + e(0.8)),  # c=(.6,.8): partner a; others b, d
        -1.0 + math.log(e(0.0) + e(1.0) + e(0.8)),  # d=(0,1): partner b; others a, c
    ]
    assert nt_xent_loss(z1, z2, tau=1.0).item() == pytest.approx(sum(rows) / 4, abs=1e-12)


def test_nt_xent_matches_loop_reference_and_is_zero_for_one_pair():
    rng = np.random.default_rng(3)
    z1, z2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    assert nt_xent_loss(t(z1), t(z2), tau=0.5).item() == pytest.approx(nt_xent_loop(z1, z2, 0.5), rel=1e-10)
    assert nt_xent_loss(t(z1[:1]), t(z2[:1])).item() == pytest.approx(0.0, abs=1e-12)
