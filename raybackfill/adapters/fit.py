"""Fit adapters on a paired table, score them on held-out pairs, and save the one that passes the gate.

The pairs are split once, seeded (stratified by label when there is one): ``test_fraction`` of them is held
out for the gate (:mod:`raybackfill.adapters.scores`) and never seen by any fit; the closed-form fits carve
their validation rows (lambda, rank) from the rest, the trained ones their epoch-choosing rows likewise. Every
adapter is stored as a transformation the backfill, `raybackfill transform` and the index already run:

- closed form (procrustes, affine, lowrank): ``linear_forward`` / ``linear_reverse``
  (:class:`~raybackfill.models.transformations.LinearTransformation`), the fitted matrix as its weights;
- mlp: the FCT MLP ``forward_transformation`` (old -> new) or psi's ``reverse_transformation`` (new -> old);
- fastfill: ``fastfill_transformation`` (old -> new only: its uncertainty orders the gallery's backfill).

model.json's ``adapter`` records the kind, the direction, the encoders' versions, what the fit chose and the
held-out score. An adapter below ``min_recall`` is not written (choice: a committed artefact is one that passed
its bar, so a later job can never pick up a failed one by its path); the report still carries its figures.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from raybackfill.adapters import linear
from raybackfill.adapters.paired import Pairs, read_pairs
from raybackfill.adapters.scores import AdapterScore, score_adapter
from raybackfill.adapters.trained import train_mlp, training_table
from raybackfill.data.splits import holdout
from raybackfill.models.artifacts import ModelSpec, save_model
from raybackfill.models.registry import build_model
from raybackfill.models.transformations import LinearTransformation, apply_transformation
from raybackfill.train.trainer import TrainConfig
from raybackfill.types import (
    CLOSED_FORM_ADAPTERS,
    MODEL_METRICS,
    AdapterDirection,
    AdapterKind,
    AdapterLoss,
    Method,
    Metric,
    parse,
)

logger = logging.getLogger(__name__)


@dataclass
class AdapterConfig:
    """How adapters are fitted and gated. Defaults run locally on a paired sample of a few thousand rows."""

    direction: AdapterDirection = AdapterDirection.OLD_TO_NEW
    metric: Metric = Metric.COSINE  # how the index will score: the gate searches with it
    k: int = 10  # recall@k of the gate
    min_recall: float | None = None  # the bar (the CLI requires one); None: record the score, refuse nothing
    test_fraction: float = 0.2  # pairs held out for the gate
    max_test_rows: int = 5000  # the gate scores at most this many (a search of n x n)
    validation_fraction: float = 0.1  # of the remaining pairs: lambda / rank / epoch choice
    seed: int = 0
    # L2-normalise inputs (in the module) and targets before fitting: what cosine retrieval sees. None: for cosine.
    normalize: bool | None = None
    side_info: bool = False  # old -> new adapters also read the pairs' side-information
    rank: int | None = None  # lowrank: the rank (None: chosen on validation among powers of two)
    loss: AdapterLoss = AdapterLoss.MSE_COSINE  # trained kinds
    hidden_dim: int = 128  # trained kinds: the MLP's width (psi: its hidden layer is 2x this)
    mixer_dim: int = 512  # old -> new MLPs: the mixer's width

    def __post_init__(self) -> None:
        self.direction = parse(AdapterDirection, self.direction, what="direction")
        self.metric = parse(Metric, self.metric, among=MODEL_METRICS)
        self.loss = parse(AdapterLoss, self.loss, what="adapter loss")
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.min_recall is not None and not 0.0 <= self.min_recall <= 1.0:
            raise ValueError(f"min_recall must be in [0, 1], got {self.min_recall}")
        for name in ("test_fraction", "validation_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.side_info and self.direction is AdapterDirection.NEW_TO_OLD:
            raise ValueError("side-information belongs to old items: only an old-to-new adapter reads it")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")

    @property
    def normalizes(self) -> bool:
        return self.metric is Metric.COSINE if self.normalize is None else self.normalize


@dataclass
class FittedAdapter:
    """One adapter fitted and scored (not yet saved)."""

    kind: AdapterKind
    architecture: str
    kwargs: dict
    module: nn.Module
    score: AdapterScore
    fit: dict = field(default_factory=dict)  # what the fit chose (lambda, rank, ...)
    training: dict = field(default_factory=dict)  # trained kinds: the run's summary

    def passes(self, min_recall: float | None) -> bool:
        return min_recall is None or self.score.recall >= min_recall


@dataclass
class AdapterReport:
    """Every adapter fitted, the one kept (the best passing one, or None) and the spec it was saved with."""

    fitted: list[FittedAdapter]
    chosen: FittedAdapter | None
    spec: ModelSpec | None
    min_recall: float | None

    @property
    def passed(self) -> bool:
        return self.spec is not None

    def table(self) -> str:
        """A text table of every adapter's held-out figures, best first; the kept one is marked."""
        rows = sorted(self.fitted, key=_rank_key)
        labelled = any(f.score.labelled for f in rows)
        head = f"{'kind':<11}{'recall@k':>9}{'pair top-1':>11}"
        head += f"{'top-1':>8}{'mAP':>8}{'old/old':>9}" if labelled else ""
        lines = [head + "  gate"]
        for f in rows:
            s = f.score
            line = f"{f.kind.value:<11}{s.recall:>9.4f}{s.pair_top1:>11.4f}"
            if labelled and s.labelled:
                line += f"{s.labelled['adapted_top1']:>8.4f}{s.labelled['adapted_map']:>8.4f}"
                line += f"{s.labelled['old_old_top1']:>9.4f}"
            verdict = "pass" if f.passes(self.min_recall) else "below bar"
            lines.append(line + f"  {verdict}{'  (kept)' if f is self.chosen and self.passed else ''}")
        return "\n".join(lines)


def _rank_key(fitted: FittedAdapter) -> tuple:
    """Best first: recall@k, then pair top-1, then the order of AdapterKind (the cheaper map)."""
    return (-fitted.score.recall, -fitted.score.pair_top1, list(AdapterKind).index(fitted.kind))


def split_pairs(pairs: Pairs, config: AdapterConfig) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (fit rows, held-out rows): a seeded hold-out, stratified by label when the pairs have one."""
    test = holdout(pairs.ids, pairs.labels, config.test_fraction, max_rows=config.max_test_rows, seed=config.seed)
    if test.sum() < 2 or (~test).sum() < 4:
        raise ValueError(
            f"{pairs.source}: {len(pairs)} pairs are too few to fit and hold out {config.test_fraction:.0%} "
            "for the gate; sample more"
        )
    return ~test, test


def _normalized(v: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{int((norms == 0).sum())} zero vectors in the pairs: they have no direction to map")
    return v / norms


def _inputs(pairs: Pairs, config: AdapterConfig) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(input, side-information, target) of the adapter in its direction, as stored (not normalised)."""
    if config.direction is AdapterDirection.OLD_TO_NEW:
        if config.side_info and pairs.side is None:
            raise ValueError(f"{pairs.source}: side-information asked for, but the pairs have no 'side' column")
        return pairs.old, pairs.side if config.side_info else None, pairs.new
    return pairs.new, None, pairs.old


def fit_closed_form(kind: AdapterKind, pairs: Pairs, config: AdapterConfig) -> tuple[str, dict, nn.Module, dict]:
    """Fit a closed-form adapter on ``pairs`` (the fit rows). Returns (architecture, kwargs, module, fit record)."""
    x, side, y = _inputs(pairs, config)
    normalize = config.normalizes
    features = [v if not normalize else _normalized(v) for v in (x, side) if v is not None]
    design = np.concatenate(features, axis=1).astype(np.float64)
    target = (_normalized(y) if normalize else y).astype(np.float64)
    record: dict = {"normalize": normalize, "fit_rows": len(pairs)}
    if kind is AdapterKind.PROCRUSTES:
        fitted = linear.procrustes(design, target)
        bias = False
    else:
        val = holdout(pairs.ids, pairs.labels, config.validation_fraction, seed=config.seed + 1)
        if val.sum() < 2 or (~val).sum() < 2:
            raise ValueError(f"{len(pairs)} fit pairs are too few to carve validation rows for lambda")
        args = (design[~val], target[~val], design[val], target[val])
        if kind is AdapterKind.AFFINE:
            fitted, selection = linear.fit_affine(*args)
        else:
            ranks = [config.rank] if config.rank is not None else None
            fitted, selection = linear.fit_lowrank(*args, ranks=ranks)
        record |= {
            "lambda": selection.lam,
            "lambda_factor": selection.lam_factor,
            "val_mse": selection.val_mse,
            "validation_rows": int(val.sum()),
        }
        if selection.rank is not None:
            record["rank"] = selection.rank
        bias = True
    d_in, d_out = x.shape[1], y.shape[1]
    if config.direction is AdapterDirection.OLD_TO_NEW:
        architecture = "linear_forward"
        kwargs = {"old_dim": d_in, "new_dim": d_out, "side_dim": None if side is None else side.shape[1]}
    else:
        architecture = "linear_reverse"
        kwargs = {"new_dim": d_in, "old_dim": d_out}
    kwargs |= {"rank": fitted.rank, "bias": bias, "normalize_input": normalize}
    module = build_model(architecture, **kwargs)
    assert isinstance(module, LinearTransformation)  # the registry's linear builders
    module.load_map(fitted.weight, fitted.bias, fitted.left, fitted.right).eval()
    return architecture, kwargs, module, record


def fit_trained(
    kind: AdapterKind, pairs: Pairs, config: AdapterConfig, train: TrainConfig
) -> tuple[str, dict, nn.Module, dict, dict]:
    """Train an MLP adapter on ``pairs`` (the fit rows) with Ray Train.

    Returns (architecture, kwargs, module, fit record, training summary)."""
    x, side, y = _inputs(pairs, config)
    target = _normalized(y) if config.normalizes else y
    if config.direction is AdapterDirection.OLD_TO_NEW:
        architecture = "fastfill_transformation" if kind is AdapterKind.FASTFILL else "forward_transformation"
        kwargs = {
            "old_dim": x.shape[1],
            "new_dim": y.shape[1],
            "side_dim": None if side is None else side.shape[1],
            "hidden_dim": config.hidden_dim,
            "mixer_dim": config.mixer_dim,
        }
    else:
        architecture = "reverse_transformation"
        kwargs = {"new_dim": x.shape[1], "old_dim": y.shape[1], "hidden_dim": 2 * config.hidden_dim}
    # One run name per kind: `--kind auto` trains mlp and fastfill, and a shared name would resume the other's run.
    train = dataclasses.replace(
        train, name=f"{train.name}-{kind.value}", validation_fraction=config.validation_fraction, seed=config.seed
    )
    table = training_table(pairs.ids, x, target, side, pairs.labels)
    weights, summary = train_mlp(
        architecture, kwargs, table, loss=config.loss, uncertainty=kind is AdapterKind.FASTFILL, train=train
    )
    module = build_model(architecture, **kwargs)
    module.load_state_dict(weights)
    module.eval()
    record = {"loss": config.loss.value, "normalize_target": config.normalizes, "fit_rows": len(pairs)}
    return architecture, kwargs, module, record, summary


def fit_adapter(
    kind: AdapterKind | str, pairs: Pairs, config: AdapterConfig, train: TrainConfig | None = None
) -> FittedAdapter:
    """Fit one adapter on the fit rows of ``pairs`` and score it on the held-out rows (see :func:`split_pairs`).

    Args:
        kind: the adapter kind.
        pairs: every paired row (the split happens here, so all kinds see the same held-out rows).
        config: the direction, the gate's settings and the fits' options.
        train: Ray Train settings, required by the trained kinds (mlp, fastfill).

    Returns:
        The :class:`FittedAdapter`, with its module in eval mode and its held-out score.
    """
    kind = parse(AdapterKind, kind, what="adapter kind")
    if kind not in auto_kinds(config.direction):
        raise ValueError(
            "fastfill's uncertainty orders the gallery's backfill: it maps old-to-new only (use mlp for psi)"
        )
    fit_rows, test_rows = split_pairs(pairs, config)
    fit_pairs, held_out = pairs.take(fit_rows), pairs.take(test_rows)
    training: dict = {}
    if kind in CLOSED_FORM_ADAPTERS:
        architecture, kwargs, module, record = fit_closed_form(kind, fit_pairs, config)
    else:
        if train is None:
            raise ValueError(f"adapter kind {kind.value!r} trains on Ray Train: pass a TrainConfig")
        architecture, kwargs, module, record, training = fit_trained(kind, fit_pairs, config, train)
    x, side, _ = _inputs(held_out, config)
    mapped, _ = apply_transformation(module, x, side)  # exactly what the backfill / transform would compute
    score = score_adapter(
        config.direction, held_out.old, held_out.new, mapped, labels=held_out.labels, k=config.k, metric=config.metric
    )
    logger.info("adapter %s %s: recall@%d %.4f on %d held-out pairs", kind, config.direction, score.k, score.recall,
                score.pairs)  # fmt: skip
    return FittedAdapter(kind, architecture, kwargs, module, score, record, training)


def save_adapter(fitted: FittedAdapter, out_uri: str, pairs: Pairs, config: AdapterConfig, *, source: str,
                 version: str | None = None) -> ModelSpec:  # fmt: skip
    """Write ``fitted`` as a transformation artefact whose model.json records the adapter and its score."""
    forward = config.direction is AdapterDirection.OLD_TO_NEW
    if forward:
        method = Method.FASTFILL if fitted.kind is AdapterKind.FASTFILL else Method.FCT
        if fitted.kwargs.get("side_dim"):
            method = Method.FASTFILL_SIDE_INFO if fitted.kind is AdapterKind.FASTFILL else Method.FCT_SIDE_INFO
    else:
        method = Method.RANK_MERGE_PSI
    record = {
        "kind": fitted.kind.value,
        "direction": config.direction.value,
        "old_model": pairs.old_version,
        "new_model": pairs.new_version,
        "paired": source,
        "fit": fitted.fit,
        "score": fitted.score.to_dict(),
        "min_recall": config.min_recall,
        "seed": config.seed,
    }
    spec = ModelSpec(
        architecture=fitted.architecture,
        version=version or out_uri.rstrip("/").rsplit("/", 1)[-1],
        kwargs=fitted.kwargs,
        metric=config.metric,
        method=method,
        training_data=source,
        parent=pairs.new_version if forward else pairs.old_version,
        training=fitted.training,
        adapter=record,
    )
    return save_model(fitted.module, out_uri, spec)


def train_adapter(
    paired: str | Pairs,
    out_uri: str,
    kinds: list[AdapterKind] | AdapterKind | str,
    config: AdapterConfig | None = None,
    *,
    train: TrainConfig | None = None,
    version: str | None = None,
) -> AdapterReport:
    """Fit each of ``kinds`` on the paired table, score them on the same held-out pairs and save the best one
    that reaches ``config.min_recall`` to ``out_uri``; nothing is written when none does.

    Args:
        paired: the paired table's URI (see :mod:`raybackfill.adapters.paired`) or pairs in memory.
        out_uri: the artefact directory to create (never overwritten).
        kinds: one kind, or several (``--kind auto``: all that apply to the direction).
        config: direction, gate and fit options (default :class:`AdapterConfig`).
        train: Ray Train settings for mlp / fastfill.
        version: recorded in model.json (default: the last part of ``out_uri``).

    Returns:
        The :class:`AdapterReport`: every fit's figures, the kept one and its spec (None below the bar).

    Examples:
        >>> report = train_adapter("pairs/", "models/adapter", "procrustes",
        ...                        AdapterConfig(min_recall=0.8))  # doctest: +SKIP
        >>> print(report.table())  # doctest: +SKIP
    """
    config = config or AdapterConfig()
    pairs = paired if isinstance(paired, Pairs) else read_pairs(paired)
    source = pairs.source
    wanted = [parse(AdapterKind, k, what="adapter kind") for k in ([kinds] if isinstance(kinds, str) else kinds)]
    fitted = [fit_adapter(kind, pairs, config, train) for kind in wanted]
    best = min(fitted, key=_rank_key)
    spec = None
    if best.passes(config.min_recall):
        spec = save_adapter(best, out_uri, pairs, config, source=source, version=version)
    return AdapterReport(fitted, best, spec, config.min_recall)


def auto_kinds(direction: AdapterDirection | str) -> list[AdapterKind]:
    """Every kind that applies to ``direction`` (fastfill maps old-to-new only)."""
    direction = parse(AdapterDirection, direction, what="direction")
    return [k for k in AdapterKind if not (k is AdapterKind.FASTFILL and direction is AdapterDirection.NEW_TO_OLD)]
