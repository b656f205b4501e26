"""Research diagnostics of a FastFill-style uncertainty head: figures that explain a result, not policies.

- :func:`uncertainty_agreement`: does the head's predicted uncertainty rank items by their true
  transformation error? Spearman correlations of the scores against three errors.
- :func:`with_oracle_loss` and :data:`ORACLE_ORDER`: the backfill order a perfect head would give, by each
  item's true FastFill loss L_i. It reads the new embeddings a real backfill has not made yet, so it is a
  bound on what any uncertainty head could gain on the data, never an order production could use.

The demo computes them only when asked (``raybackfill demo --diagnostics``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import torch

from raybackfill.compat.losses import fastfill_item_loss
from raybackfill.eval.metrics import prepare
from raybackfill.eval.offline import Embeddings, Order
from raybackfill.types import Metric

ORACLE_LOSS = "oracle_loss"
ORACLE_ORDER = Order(column=ORACLE_LOSS)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties broken by position: fine for continuous scores)."""
    ranks = []
    for x in (a, b):
        r = np.empty(len(x))
        r[np.argsort(x, kind="stable")] = np.arange(len(x))
        ranks.append(r)
    return float(np.corrcoef(ranks[0], ranks[1])[0, 1])


def uncertainty_agreement(scores: np.ndarray, transformed: np.ndarray, new: np.ndarray) -> dict[str, float]:
    """Spearman of the head's ``scores`` against the per-item MSE it is trained on (key ``""``), against
    the angular error 1 - cos(h, new) (key ``"_angular"``), the only part of the error a cosine index ranks
    by, and against |h| itself (key ``"_norm"``), which a cosine index ignores. The first two disagree where
    the new embeddings' norms vary from item to item; ``_norm`` near 1 means the head mostly ranks by how long
    the vectors it emits are."""
    mse = ((transformed - new) ** 2).mean(axis=1)
    cosines = (prepare(transformed, Metric.COSINE) * prepare(new, Metric.COSINE)).sum(axis=1)
    return {
        "": spearman(scores, mse),
        "_angular": spearman(scores, 1.0 - cosines),
        "_norm": spearman(scores, np.linalg.norm(transformed, axis=1)),
    }


def uncertainty_diagnostics(
    method: str, scores: np.ndarray, transformed: np.ndarray, new: np.ndarray
) -> dict[str, float]:
    """:func:`uncertainty_agreement` under the report's names, ``<method>_uncertainty_spearman<suffix>``."""
    agreement = uncertainty_agreement(scores, transformed, new)
    return {f"{method}_uncertainty_spearman{suffix}": value for suffix, value in agreement.items()}


def with_oracle_loss(
    gallery: Embeddings, transformed: np.ndarray, new: np.ndarray, labels: np.ndarray, new_classifier: torch.nn.Linear
) -> Embeddings:
    """The old gallery with an ``oracle_loss`` column, each item's true FastFill L_i (see ORACLE_ORDER)."""
    with torch.inference_mode():
        loss = fastfill_item_loss(
            torch.from_numpy(transformed),
            torch.from_numpy(new),
            torch.from_numpy(labels).long(),
            new_classifier.weight,
            new_classifier.bias,
        ).numpy()
    column = pa.array(loss.astype(np.float64))
    return dataclasses.replace(gallery, table=gallery.table.append_column(ORACLE_LOSS, column))
