"""Backfill priority policies: a score per gallery item from what is already stored, highest first.

A policy must rank the whole gallery *before* any item is re-embedded, so it may only read the stored
old embedding (and side-information) of an item, never its image or its new embedding:
- ``uncertainty``: FastFill's predicted log-variance s_i of the forward transformation on (old, side);
  a high s_i means the transformed embedding is likely far from the true new one.
- ``entropy`` / ``least_confidence``: how unsure the old classifier is on the old embedding (RACT's
  uncertainty-based order): H(p) = -sum_c p_c log p_c, and 1 - max_c p_c, with p = softmax(W o + b).
- ``random``: a seeded hash of (seed, id), so a score depends on nothing but the id: any shard of the
  gallery can be scored alone, in any row order, and gets the same scores.
- ``id``: ascending id (score -id), the order of a plain sequential re-embedding.

:func:`priority_order` turns scores into the backfill order: highest score first, ties by ascending id,
so the order is deterministic whatever the row order of the input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from raybackfill.hashing import GOLDEN_GAMMA, splitmix64_finalize
from raybackfill.types import Policy, parse

if TYPE_CHECKING:
    import torch

# Policies that score the stored old embedding (the others read only the id).
OLD_EMBEDDING_POLICIES = (Policy.UNCERTAINTY, Policy.ENTROPY, Policy.LEAST_CONFIDENCE)
# Policies that read the old model's classifier.
CLASSIFIER_POLICIES = (Policy.ENTROPY, Policy.LEAST_CONFIDENCE)
# Rows per forward pass of the FastFill head: bounds memory on large galleries.
_CHUNK = 65_536


def _vectors(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, d), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN/inf in {int((~np.isfinite(x).all(1)).sum())} rows")
    return x


def classifier_log_probs(old: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """log softmax(old @ weight.T + bias), in float64: (N, d) embeddings, (C, d) weight -> (N, C)."""
    old = _vectors(old, "old embeddings").astype(np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim != 2 or weight.shape[1] != old.shape[1]:
        raise ValueError(f"classifier weight must be (classes, {old.shape[1]}), got {weight.shape}")
    logits = old @ weight.T
    if bias is not None:
        logits += np.asarray(bias, dtype=np.float64)[None, :]
    peak = logits.max(axis=1, keepdims=True)
    return logits - peak - np.log(np.exp(logits - peak).sum(axis=1, keepdims=True))


def entropy_scores(old: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """H_i = -sum_c p_ic log p_ic of the old classifier on the old embedding (nats; 0 .. log C)."""
    log_p = classifier_log_probs(old, weight, bias)
    return -(np.exp(log_p) * log_p).sum(axis=1)


def least_confidence_scores(old: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """1 - max_c p_ic of the old classifier on the old embedding (0 .. 1 - 1/C)."""
    return 1.0 - np.exp(classifier_log_probs(old, weight, bias).max(axis=1))


def uncertainty_scores(transformation: torch.nn.Module, old: np.ndarray, side: np.ndarray | None = None) -> np.ndarray:
    """FastFill's s_i from a transformation returning ``(h, s)`` (eval mode, no gradients), float64."""
    import torch  # here, not at the top: Ray workers that only copy plan tiers import this module, not torch

    old = _vectors(old, "old embeddings")
    if side is not None:
        side = _vectors(side, "side-information")
        if len(side) != len(old):
            raise ValueError(f"{len(side)} side-information rows for {len(old)} old embeddings")
    was_training = transformation.training
    transformation.eval()
    parts = []
    try:
        with torch.inference_mode():
            for start in range(0, len(old), _CHUNK):
                stop = start + _CHUNK
                args = [torch.as_tensor(old[start:stop], dtype=torch.float32)]
                if side is not None:
                    args.append(torch.as_tensor(side[start:stop], dtype=torch.float32))
                result = transformation(*args)
                if not isinstance(result, tuple) or len(result) != 2:
                    raise ValueError("the uncertainty policy needs a FastFill transformation returning (h, s)")
                parts.append(result[1].reshape(-1).double().numpy())
    finally:
        transformation.train(was_training)
    return np.concatenate(parts) if parts else np.zeros(0)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function: the finaliser of ``x`` plus the golden-ratio increment."""
    with np.errstate(over="ignore"):
        return splitmix64_finalize(x + GOLDEN_GAMMA)


def random_scores(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """Uniform scores in [0, 1) from hash(seed, id): the same id and seed always give the same score."""
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    keys = np.asarray(ids, dtype=np.int64).view(np.uint64)
    mixed = _splitmix64(keys ^ _splitmix64(np.full(keys.shape, seed, dtype=np.uint64)))
    return (mixed >> np.uint64(11)).astype(np.float64) / 2.0**53


def id_scores(ids: np.ndarray) -> np.ndarray:
    """-id: ascending id first. Ids beyond 2^53 may round to equal scores; the id tie-break keeps them in order."""
    return -np.asarray(ids, dtype=np.int64).astype(np.float64)


def priority_order(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions sorted by score, highest first; equal scores by ascending id. Ids must be unique."""
    scores = np.asarray(scores, dtype=np.float64)
    ids = np.asarray(ids, dtype=np.int64)
    if scores.shape != ids.shape or scores.ndim != 1:
        raise ValueError(f"need one score per id, got scores {scores.shape} and ids {ids.shape}")
    if np.isnan(scores).any():
        raise ValueError(f"{int(np.isnan(scores).sum())} priority scores are NaN")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("ids must be unique for a deterministic order")
    return np.lexsort((ids, -scores))


def priority_scores(
    policy: Policy,
    ids: np.ndarray,
    *,
    old: np.ndarray | None = None,
    side: np.ndarray | None = None,
    classifier: tuple[np.ndarray, np.ndarray | None] | None = None,
    transformation: torch.nn.Module | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Scores of one policy for the items ``ids`` (rows of ``old`` / ``side`` aligned with ``ids``).

    ``classifier`` is the old model's (weight, bias) for entropy / least_confidence; ``transformation``
    the FastFill transformation for uncertainty (with ``side`` when it was trained with side-information).
    """
    policy = parse(Policy, policy)
    ids = np.asarray(ids, dtype=np.int64)
    if policy in OLD_EMBEDDING_POLICIES and (old is None or len(old) != len(ids)):
        raise ValueError(f"policy {policy.value!r} needs one old embedding per id")
    if policy is Policy.UNCERTAINTY:
        if transformation is None:
            raise ValueError("policy 'uncertainty' needs the FastFill transformation")
        assert old is not None  # checked above for every policy of OLD_EMBEDDING_POLICIES
        return uncertainty_scores(transformation, old, side)
    if policy in CLASSIFIER_POLICIES:
        if classifier is None:
            raise ValueError(f"policy {policy.value!r} needs the old classifier (weight, bias)")
        score = entropy_scores if policy is Policy.ENTROPY else least_confidence_scores
        assert old is not None  # checked above for every policy of OLD_EMBEDDING_POLICIES
        return score(old, *classifier)
    if policy is Policy.RANDOM:
        return random_scores(ids, seed)
    return id_scores(ids)
