"""Closed-form linear maps between two embedding spaces, fitted on paired rows: pure numpy.

Rows are vectors: a map sends ``x`` (d_in) to ``x @ weight + bias`` (d_out). Three fits:

- :func:`procrustes`: ``W = U V^T`` from the SVD ``X^T Y = U S V^T`` (thin), no bias. For ``d_in == d_out`` this
  is the orthogonal W minimising ``||X W - Y||_F``; for ``d_in < d_out`` W has orthonormal rows (an isometry
  into the larger space) and is still the least-squares one (``||X W||`` does not depend on W then); for
  ``d_in > d_out`` W has orthonormal columns and maximises ``tr(W^T X^T Y)``, which is the least-squares
  solution when ``X^T X`` is a multiple of the identity (the general unbalanced problem has no closed form).
- :func:`ridge`: ``W = (Xc^T Xc + lambda I)^+ Xc^T Yc`` on centred rows, ``b = mean(Y) - mean(X) W``; lambda 0 is
  ordinary least squares (a pseudo-inverse where ``Xc`` is rank-deficient).
- :func:`reduced_rank`: the rank-r affine map of reduced-rank (ridge) regression: with W the ridge solution and
  V_r the top-r right singular vectors of the fitted values ``Xc W``, ``W_r = W V_r V_r^T``, stored as the two
  factors ``W V_r`` (d_in x r) and ``V_r^T`` (r x d_out). With lambda 0 it minimises ``||Xc A - Yc||`` over
  every A of rank <= r.

:func:`fit_affine` and :func:`fit_lowrank` choose lambda (and the rank) by the mean squared error on validation
rows held out of the training pairs; the candidates are multiples of the mean eigenvalue of ``Xc^T Xc / n``, so
the grid follows the data's scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# Ridge strengths tried, as multiples of the mean eigenvalue of the training rows' covariance (0 = least squares).
LAMBDA_GRID = (0.0, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
# Relative size under which an eigenvalue of the covariance counts as zero (the pseudo-inverse drops it).
EIGEN_TOLERANCE = 1e-10


@dataclass(frozen=True)
class LinearMap:
    """``y = x @ weight + bias``; a low-rank map also keeps its factors (``weight == left @ right``)."""

    weight: np.ndarray  # (d_in, d_out)
    bias: np.ndarray  # (d_out,)
    left: np.ndarray | None = field(default=None, repr=False)  # (d_in, r)
    right: np.ndarray | None = field(default=None, repr=False)  # (r, d_out)

    @property
    def rank(self) -> int | None:
        """The factored rank r, or None for a full map."""
        return None if self.left is None else int(self.left.shape[1])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The mapped rows (float64)."""
        return np.asarray(x, dtype=np.float64) @ self.weight + self.bias


@dataclass(frozen=True)
class Selection:
    """What a validated fit chose and the validation error of every candidate tried."""

    lam: float  # the ridge strength chosen (absolute)
    lam_factor: float  # the same, as a multiple of the mean covariance eigenvalue
    rank: int | None
    val_mse: float
    candidates: list[dict] = field(default_factory=list)  # {"lam_factor", "rank", "val_mse"} per candidate


def _check_pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"paired rows must be 2-D, got {x.shape} and {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} input rows for {len(y)} target rows: the pairs must align")
    if len(x) < 2:
        raise ValueError(f"need at least 2 pairs to fit a map, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired rows contain NaN or inf")
    return x, y


def procrustes(x: np.ndarray, y: np.ndarray) -> LinearMap:
    """The (semi-)orthogonal map ``W = U V^T`` of the SVD of ``X^T Y``, without bias.

    Args:
        x: (n, d_in) input rows.
        y: (n, d_out) target rows, paired with ``x`` row by row.

    Returns:
        A :class:`LinearMap` whose weight has orthonormal rows (d_in <= d_out) or columns (d_in > d_out).

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
        >>> x = rng.normal(size=(50, 4))
        >>> bool(np.allclose(procrustes(x, x @ q).weight, q))
        True
    """
    x, y = _check_pair(x, y)
    u, _, vt = np.linalg.svd(x.T @ y, full_matrices=False)
    return LinearMap(u @ vt, np.zeros(y.shape[1]))


@dataclass(frozen=True)
class _Centred:
    """Centred training rows and the eigen-decomposition of their (unnormalised) covariance ``Xc^T Xc``."""

    x_mean: np.ndarray
    y_mean: np.ndarray
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    xty: np.ndarray  # Xc^T Yc
    xc: np.ndarray
    n: int

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray) -> _Centred:
        x_mean, y_mean = x.mean(0), y.mean(0)
        xc, yc = x - x_mean, y - y_mean
        eigenvalues, eigenvectors = np.linalg.eigh(xc.T @ xc)
        return cls(x_mean, y_mean, np.clip(eigenvalues, 0.0, None), eigenvectors, xc.T @ yc, xc, len(x))

    @property
    def scale(self) -> float:
        """The mean eigenvalue of ``Xc^T Xc / n``: the unit of the lambda grid."""
        return float(self.eigenvalues.mean()) / self.n

    def weight(self, lam: float) -> np.ndarray:
        """The ridge weight for an absolute ``lam`` (penalty on ``||W||^2`` against the summed squared error)."""
        tolerance = EIGEN_TOLERANCE * max(float(self.eigenvalues.max()), 1e-300)
        denominator = self.eigenvalues + lam * self.n
        inverse = np.where(denominator > tolerance, 1.0 / np.maximum(denominator, tolerance), 0.0)
        return self.eigenvectors @ (inverse[:, None] * (self.eigenvectors.T @ self.xty))

    def affine(self, weight: np.ndarray, left=None, right=None) -> LinearMap:
        return LinearMap(weight, self.y_mean - self.x_mean @ weight, left, right)

    def reduced(self, weight: np.ndarray, rank: int) -> LinearMap:
        _, _, vt = np.linalg.svd(self.xc @ weight, full_matrices=False)
        right = vt[:rank]  # (r, d_out)
        left = weight @ right.T  # (d_in, r)
        return self.affine(left @ right, left, right)


def ridge(x: np.ndarray, y: np.ndarray, lam: float = 0.0) -> LinearMap:
    """The affine map minimising ``mean_i ||x_i W + b - y_i||^2 + lam ||W||_F^2`` (the bias is not penalised).

    Args:
        x: (n, d_in) input rows.
        y: (n, d_out) target rows.
        lam: the ridge strength, on the scale of the mean squared error (0: least squares, with a
            pseudo-inverse where the centred inputs are rank-deficient).

    Returns:
        The fitted :class:`LinearMap`.

    Examples:
        >>> x = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [2.0, 1.0]])
        >>> fit = ridge(x, x @ np.array([[2.0], [-1.0]]) + 3.0)
        >>> np.round(fit.weight.ravel(), 6).tolist(), round(float(fit.bias[0]), 6)
        ([2.0, -1.0], 3.0)
    """
    if lam < 0:
        raise ValueError(f"lam must be non-negative, got {lam}")
    x, y = _check_pair(x, y)
    centred = _Centred.of(x, y)
    return centred.affine(centred.weight(lam))


def reduced_rank(x: np.ndarray, y: np.ndarray, rank: int, lam: float = 0.0) -> LinearMap:
    """The rank-``rank`` affine map of reduced-rank ridge regression (see the module docstring).

    Args:
        x: (n, d_in) input rows.
        y: (n, d_out) target rows.
        rank: the map's rank, 1 <= rank <= min(d_in, d_out).
        lam: the ridge strength, as in :func:`ridge`.

    Returns:
        A :class:`LinearMap` with its factors ``left`` (d_in, rank) and ``right`` (rank, d_out).

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> a = rng.normal(size=(6, 1)) @ rng.normal(size=(1, 5))  # a rank-1 map
        >>> x = rng.normal(size=(40, 6))
        >>> bool(np.allclose(reduced_rank(x, x @ a, 1).weight, a))
        True
    """
    x, y = _check_pair(x, y)
    if not 1 <= rank <= min(x.shape[1], y.shape[1]):
        raise ValueError(f"rank must be in [1, {min(x.shape[1], y.shape[1])}], got {rank}")
    if lam < 0:
        raise ValueError(f"lam must be non-negative, got {lam}")
    centred = _Centred.of(x, y)
    return centred.reduced(centred.weight(lam), rank)


def mse(fit: LinearMap, x: np.ndarray, y: np.ndarray) -> float:
    """Mean squared error per dimension of ``fit`` on paired rows."""
    return float(np.mean((fit.apply(x) - np.asarray(y, dtype=np.float64)) ** 2))


def default_ranks(d_in: int, d_out: int) -> list[int]:
    """The ranks :func:`fit_lowrank` tries when none is given: powers of two from 4 below ``min(d_in, d_out)``."""
    top = min(d_in, d_out)
    ranks = [r for r in (2**i for i in range(2, 16)) if r < top]
    return ranks or [max(top - 1, 1)]


def fit_affine(
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    lambdas: Sequence[float] = LAMBDA_GRID,
) -> tuple[LinearMap, Selection]:
    """:func:`ridge` with lambda chosen by the validation pairs' mean squared error.

    Args:
        x, y: training pairs.
        x_val, y_val: validation pairs (held out of the training pairs).
        lambdas: candidate strengths, as multiples of the mean covariance eigenvalue (ties go to the first).

    Returns:
        The map refitted with the chosen lambda on the training pairs, and the :class:`Selection`.
    """
    return _select(x, y, x_val, y_val, lambdas, ranks=[None])


def fit_lowrank(
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    ranks: Sequence[int] | None = None,
    lambdas: Sequence[float] = LAMBDA_GRID,
) -> tuple[LinearMap, Selection]:
    """:func:`reduced_rank` with the rank (from ``ranks``, default :func:`default_ranks`) and lambda chosen by
    the validation pairs' mean squared error; a tie keeps the candidate tried first (the smaller lambda, then the
    smaller rank: the cheaper map)."""
    x, y = _check_pair(x, y)
    ranks = sorted(set(ranks or default_ranks(x.shape[1], y.shape[1])))
    top = min(x.shape[1], y.shape[1])
    if not all(1 <= r <= top for r in ranks):
        raise ValueError(f"ranks must be in [1, {top}], got {ranks}")
    return _select(x, y, x_val, y_val, lambdas, ranks=list(ranks))


def _select(
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    lambdas: Sequence[float],
    ranks: list[int | None],
) -> tuple[LinearMap, Selection]:
    x, y = _check_pair(x, y)
    x_val, y_val = _check_pair(x_val, y_val)
    if x_val.shape[1] != x.shape[1] or y_val.shape[1] != y.shape[1]:
        raise ValueError("validation pairs have other dimensions than the training pairs")
    if not lambdas or min(lambdas) < 0:
        raise ValueError(f"lambdas must be non-negative and not empty, got {list(lambdas)}")
    centred = _Centred.of(x, y)
    best: tuple[float, LinearMap, float, int | None] | None = None
    candidates = []
    for factor in lambdas:
        weight = centred.weight(factor * centred.scale)
        for rank in ranks:
            fit = centred.affine(weight) if rank is None else centred.reduced(weight, rank)
            error = mse(fit, x_val, y_val)
            candidates.append({"lam_factor": float(factor), "rank": rank, "val_mse": error})
            # strictly better by a relative margin: equal fits keep the simpler candidate found first
            if best is None or error < best[0] * (1 - 1e-9) - 1e-15:
                best = (error, fit, float(factor), rank)
    assert best is not None  # lambdas and ranks are not empty
    error, fit, factor, rank = best
    selection = Selection(factor * centred.scale, factor, rank, error, candidates)
    return fit, selection
