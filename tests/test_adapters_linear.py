"""Closed-form adapters against hand-computed values and numpy / scipy / scikit-learn references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes
from sklearn.linear_model import Ridge

from raybackfill.adapters import linear
from raybackfill.models.registry import build_model
from raybackfill.models.transformations import apply_transformation


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) matrix with orthonormal rows (rows <= cols) or columns (rows > cols)."""
    q, _ = np.linalg.qr(rng.normal(size=(max(rows, cols), min(rows, cols))))
    return q if rows >= cols else q.T


def test_procrustes_hand_computed_rotation():
    # x rotated by 90 degrees: (1, 0) -> (0, 1), (0, 1) -> (-1, 0)
    x = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    rotation = np.array([[0.0, 1.0], [-1.0, 0.0]])
    fit = linear.procrustes(x, x @ rotation)
    np.testing.assert_allclose(fit.weight, rotation, atol=1e-12)
    np.testing.assert_array_equal(fit.bias, [0.0, 0.0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_procrustes_matches_scipy_on_square_noisy_data(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, 12))
    y = x @ _orthonormal(rng, 12, 12) + 0.3 * rng.normal(size=(200, 12))
    reference, _ = orthogonal_procrustes(x, y)
    np.testing.assert_allclose(linear.procrustes(x, y).weight, reference, atol=1e-10)


def test_procrustes_recovers_an_isometry_into_a_larger_space():
    rng = np.random.default_rng(3)
    q = _orthonormal(rng, 8, 20)  # orthonormal rows: ||x q|| = ||x||
    x = rng.normal(size=(100, 8)) * np.linspace(0.2, 5.0, 8)  # anisotropic inputs
    fit = linear.procrustes(x, x @ q)
    np.testing.assert_allclose(fit.weight, q, atol=1e-10)
    np.testing.assert_allclose(fit.weight @ fit.weight.T, np.eye(8), atol=1e-10)


def test_procrustes_into_a_smaller_space_is_exact_for_isotropic_inputs_and_semi_orthogonal_always():
    rng = np.random.default_rng(4)
    q = _orthonormal(rng, 20, 8)  # orthonormal columns: a projection
    x = _orthonormal(rng, 400, 20) * 20.0  # x^T x = 400 I
    fit = linear.procrustes(x, x @ q)
    np.testing.assert_allclose(fit.weight, q, atol=1e-10)
    anisotropic = linear.procrustes(rng.normal(size=(300, 20)) * np.linspace(0.1, 3, 20), rng.normal(size=(300, 8)))
    np.testing.assert_allclose(anisotropic.weight.T @ anisotropic.weight, np.eye(8), atol=1e-10)


def test_procrustes_maximises_the_trace_against_random_semi_orthogonal_maps():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(80, 10)), rng.normal(size=(80, 6))
    best = np.trace(linear.procrustes(x, y).weight.T @ x.T @ y)
    for _ in range(200):
        assert np.trace(_orthonormal(rng, 10, 6).T @ x.T @ y) <= best + 1e-9


def test_ridge_hand_computed_least_squares():
    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    y = np.array([[1.0], [3.0], [5.0], [7.0]])  # y = 2x + 1
    fit = linear.ridge(x, y)
    np.testing.assert_allclose(fit.weight, [[2.0]], atol=1e-12)
    np.testing.assert_allclose(fit.bias, [1.0], atol=1e-12)


@pytest.mark.parametrize(("d_in", "d_out"), [(6, 6), (5, 9), (9, 4)])
def test_ridge_recovers_a_known_affine_map_across_dimensions(d_in, d_out):
    rng = np.random.default_rng(d_in * 10 + d_out)
    a, b = rng.normal(size=(d_in, d_out)), rng.normal(size=d_out)
    x = rng.normal(size=(60, d_in)) * rng.uniform(0.1, 4.0, size=d_in)  # scaled dimensions
    fit = linear.ridge(x, x @ a + b)
    np.testing.assert_allclose(fit.weight, a, atol=1e-9)
    np.testing.assert_allclose(fit.bias, b, atol=1e-9)
    reference, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(x))], x @ a + b, rcond=None)
    np.testing.assert_allclose(np.r_[fit.weight, fit.bias[None]], reference, atol=1e-9)


@pytest.mark.parametrize("lam", [0.01, 0.5, 3.0])
def test_ridge_matches_scikit_learn(lam):
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(150, 10)), rng.normal(size=(150, 4))
    fit = linear.ridge(x, y, lam)
    # scikit-learn penalises the summed squared error: alpha = n * lam
    reference = Ridge(alpha=len(x) * lam, fit_intercept=True, solver="svd").fit(x, y)
    np.testing.assert_allclose(fit.weight, reference.coef_.T, atol=1e-9)
    np.testing.assert_allclose(fit.bias, reference.intercept_, atol=1e-9)


def test_ridge_least_squares_on_rank_deficient_inputs_is_the_pseudo_inverse_solution():
    rng = np.random.default_rng(8)
    base = rng.normal(size=(50, 3))
    x = np.c_[base, base[:, :1] * 2.0]  # the 4th column repeats the first: rank 3
    y = rng.normal(size=(50, 2))
    fit = linear.ridge(x, y)
    xc, yc = x - x.mean(0), y - y.mean(0)
    np.testing.assert_allclose(fit.weight, np.linalg.pinv(xc) @ yc, atol=1e-8)


def _rank_r_loss_by_alternating_least_squares(x, y, rank, rng, steps=300):
    """A brute-force reference: minimise ||xc A B - yc|| over A (d_in, r), B (r, d_out) by alternating solves."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    b = rng.normal(size=(rank, y.shape[1]))
    for _ in range(steps):
        a = np.linalg.lstsq(xc, yc @ np.linalg.pinv(b), rcond=None)[0]
        b = np.linalg.lstsq(xc @ a, yc, rcond=None)[0]
    return float(np.sum((xc @ a @ b - yc) ** 2))


def test_reduced_rank_recovers_a_known_low_rank_map_and_beats_alternating_least_squares():
    rng = np.random.default_rng(9)
    a = rng.normal(size=(12, 3)) @ rng.normal(size=(3, 10))
    x = rng.normal(size=(90, 12))
    fit = linear.reduced_rank(x, x @ a + 0.5, 3)
    np.testing.assert_allclose(fit.weight, a, atol=1e-9)
    np.testing.assert_allclose(fit.bias, np.full(10, 0.5), atol=1e-9)
    np.testing.assert_allclose(fit.left @ fit.right, fit.weight, atol=1e-12)
    assert fit.rank == 3
    y = x @ rng.normal(size=(12, 10)) + rng.normal(size=(90, 10))  # full rank with noise
    ours = linear.reduced_rank(x, y, 2)
    loss = float(np.sum((ours.apply(x) - y) ** 2))
    assert loss <= _rank_r_loss_by_alternating_least_squares(x, y, 2, rng) + 1e-6
    assert np.linalg.matrix_rank(ours.weight, tol=1e-8) == 2


def test_fit_affine_picks_least_squares_without_noise_and_shrinks_with_noise():
    rng = np.random.default_rng(10)
    a = rng.normal(size=(8, 8))
    x, x_val = rng.normal(size=(200, 8)), rng.normal(size=(50, 8))
    fit, selection = linear.fit_affine(x, x @ a, x_val, x_val @ a)
    assert selection.lam == 0.0
    np.testing.assert_allclose(fit.weight, a, atol=1e-9)
    assert len(selection.candidates) == len(linear.LAMBDA_GRID)
    # 20 noisy pairs in 30 dims: least squares interpolates the noise; validation picks a positive lambda
    x, x_val = rng.normal(size=(20, 30)), rng.normal(size=(200, 30))
    w = rng.normal(size=(30, 5)) * 0.1
    noisy, selection = linear.fit_affine(
        x, x @ w + rng.normal(size=(20, 5)), x_val, x_val @ w + rng.normal(size=(200, 5))
    )
    assert selection.lam > 0
    errors = {c["lam_factor"]: c["val_mse"] for c in selection.candidates}
    assert selection.val_mse == min(errors.values()) < errors[0.0]


def test_fit_lowrank_chooses_the_true_rank_on_validation():
    rng = np.random.default_rng(11)
    a = rng.normal(size=(32, 4)) @ rng.normal(size=(4, 32))
    x, x_val = rng.normal(size=(300, 32)), rng.normal(size=(100, 32))
    noise = 0.05
    fit, selection = linear.fit_lowrank(
        x, x @ a + noise * rng.normal(size=(300, 32)), x_val, x_val @ a + noise * rng.normal(size=(100, 32))
    )
    assert selection.rank == 4
    assert fit.rank == 4
    assert linear.default_ranks(32, 64) == [4, 8, 16]
    with pytest.raises(ValueError, match="ranks must be in"):
        linear.fit_lowrank(x, x @ a, x_val, x_val @ a, ranks=[40])


def test_bad_pairs_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="must align"):
        linear.ridge(np.zeros((4, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="NaN"):
        linear.procrustes(np.array([[np.nan, 0.0], [1.0, 1.0]]), np.ones((2, 2)))
    with pytest.raises(ValueError, match="rank must be in"):
        linear.reduced_rank(np.ones((5, 3)), np.ones((5, 2)), 3)
    with pytest.raises(ValueError, match="non-negative"):
        linear.ridge(np.ones((5, 3)), np.ones((5, 2)), -1.0)


@pytest.mark.parametrize("rank", [None, 3])
def test_linear_modules_run_the_fitted_map_exactly(rank):
    rng = np.random.default_rng(12)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    fit = linear.reduced_rank(x, rng.normal(size=(40, 5)), 3) if rank else linear.ridge(x, rng.normal(size=(40, 5)))
    forward = build_model("linear_forward", old_dim=6, new_dim=5, rank=rank)
    forward.load_map(fit.weight, fit.bias, fit.left, fit.right)
    out, uncertainty = apply_transformation(forward, x)
    assert uncertainty is None
    np.testing.assert_allclose(out, fit.apply(x), atol=1e-5)
    assert forward.dims == {"old": 6, "new": 5}
    reverse = build_model("linear_reverse", new_dim=6, old_dim=5, rank=rank, normalize_input=True)
    reverse.load_map(fit.weight, fit.bias, fit.left, fit.right)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(apply_transformation(reverse, x)[0], fit.apply(unit), atol=1e-5)
    assert reverse.dims == {"new": 6, "old": 5}
    assert (forward.old_dim, forward.new_dim, reverse.old_dim, reverse.new_dim) == (6, 5, 5, 6)


def test_linear_module_with_side_information_concatenates_the_inputs():
    module = build_model("linear_forward", old_dim=2, new_dim=1, side_dim=1, bias=False)
    module.load_map(np.array([[1.0], [2.0], [3.0]]), np.zeros(1))
    out = module(torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0]]))
    assert out.item() == pytest.approx(1 + 2 + 6)
    with pytest.raises(ValueError, match="side-information"):
        module(torch.tensor([[1.0, 1.0]]))
    assert module.dims == {"old": 2, "new": 1, "side": 1}
