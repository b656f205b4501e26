"""The demo's training stages: the backbones (old, new, BCT, RACT), side-information, and the forward
(FCT / FastFill) and reverse (psi) transformations, each with the train API on Ray Train.

Only the train split reaches these functions. Every choice made while training (the backbones' learning rate,
each run's epoch) is made on a validation share held out of the run's own training rows
(``TrainConfig.validation_fraction``, see :func:`raybackfill.data.splits.holdout`), never on the gallery or
query split the report is measured on.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from raybackfill.compat.recipes import get_recipe
from raybackfill.demo.configs import DemoConfig, DemoScale, Fit
from raybackfill.demo.pipeline import BACKBONES, DemoLayout
from raybackfill.models.artifacts import ModelSpec, load_model, read_spec, save_model
from raybackfill.train.api import train_backbone, train_reverse, train_side_info, train_transformation
from raybackfill.train.quality import require_learned
from raybackfill.train.trainer import TrainConfig
from raybackfill.types import Method

logger = logging.getLogger(__name__)

TRANSFORMATIONS = (Method.FCT, Method.FCT_SIDE_INFO, Method.FASTFILL, Method.FASTFILL_SIDE_INFO)
# What trains each new backbone: the method whose backbone loss it uses.
NEW_BACKBONES = {"new": Method.INDEPENDENT, "bct": Method.BCT, "ract": Method.RACT}
SUMMARY_KEYS = ("best_epoch", "epochs", "train_accuracy", "val_accuracy", "chance_accuracy", "validation_rows")


def train_config(name: str, layout: DemoLayout, config: DemoConfig, fit: Fit) -> TrainConfig:
    return TrainConfig(
        name=name,
        storage_path=layout.runs,
        num_workers=config.num_workers,
        cpus_per_worker=config.cpus_per_worker,
        epochs=fit.epochs,
        batch_size=fit.batch_size,
        lr=fit.lr,
        seed=config.seed,
    )


def train_backbones(
    layout: DemoLayout, train: str, train_old: str, scale: DemoScale, config: DemoConfig
) -> tuple[dict[str, str], dict]:
    """Train the old model on ``train_old`` (the old classes' training rows), the new, BCT and RACT backbones
    on ``train`` and the side-information model on ``train_old``. Returns their artefacts and the report's
    ``training`` section (the learning rate chosen, each backbone's kept epoch and figures)."""
    models = {name: layout.model(name) for name in (*BACKBONES, "side_info")}
    common: dict[str, Any] = {"embedding_dim": scale.embedding_dim, "backbone_kwargs": {"width": scale.width}}

    start = time.perf_counter()
    lr, searched = choose_backbone_lr(layout, train_old, models["old"], scale, config, common)
    check_backbone("old", read_spec(models["old"]), time.perf_counter() - start, config)
    training: dict = {"backbone_lr": lr, "lr_search": searched, "backbones": {"old": backbone_summary(models["old"])}}
    new_fit = dataclasses.replace(scale.new, lr=lr)
    for name, method in NEW_BACKBONES.items():
        start = time.perf_counter()
        spec = train_backbone(
            train,
            models[name],
            method=method,
            old_model=None if method is Method.INDEPENDENT else models["old"],
            train=train_config(name, layout, config, new_fit),
            augment=scale.new.augment,
            version=name,
            tau=scale.ract_tau,
            **common,
        )
        check_backbone(name, spec, time.perf_counter() - start, config)
        training["backbones"][name] = backbone_summary(models[name])
    start = time.perf_counter()
    train_side_info(
        train_old,
        models["side_info"],
        embedding_dim=scale.side_info_dim,
        train=train_config("side_info", layout, config, scale.side_info),
    )
    logger.info("  side-info model: %.1fs", time.perf_counter() - start)
    return models, training


def check_backbone(name: str, spec: ModelSpec, seconds: float, config: DemoConfig) -> None:
    """Log how a backbone trained and stop the demo if it did not learn (see raybackfill.train.quality)."""
    t = spec.training
    figures = f"train accuracy {t['train_accuracy']:.3f}"
    if "val_accuracy" in t:
        figures += f", validation {t['val_accuracy']:.3f} (largest class {t['chance_accuracy']:.3f})"
    logger.info("  %s model: %.1fs, epoch %d/%d: %s", name, seconds, t["best_epoch"] + 1, t["epochs"], figures)
    if config.require_learning:
        require_learned(t, name)


def backbone_summary(model: str) -> dict:
    """A backbone's run as the report keeps it: the epoch kept and its figures (model.json has every epoch)."""
    t = read_spec(model).training
    return {k: t[k] for k in SUMMARY_KEYS if k in t}


def choose_backbone_lr(
    layout: DemoLayout, images: str, out: str, scale: DemoScale, config: DemoConfig, common: dict
) -> tuple[float, dict[str, float]]:
    """Train the old model at each of ``scale.backbone_lrs`` and keep the one with the best validation accuracy
    (the first listed on a tie) as ``out``; the new, BCT and RACT backbones then train at its learning rate.

    The old model is the cheapest backbone (half the classes, fewest epochs) and shares the new ones'
    architecture and images, so its validation split (held out of ``images``, the old classes' training rows)
    picks the rate for all of them. Returns the rate and every candidate's validation accuracy.
    """
    candidates = {}
    for lr in scale.backbone_lrs:
        name = f"old-lr{lr:g}"
        uri = layout.path("models", "lr-search", name)
        spec = train_backbone(
            images,
            uri,
            train=train_config(name, layout, config, dataclasses.replace(scale.old, lr=lr)),
            version="old",
            augment=scale.old.augment,
            **common,
        )
        candidates[lr] = (spec.training.get("val_accuracy", spec.training["train_accuracy"]), uri)
    best = max(candidates, key=lambda lr: (candidates[lr][0], -scale.backbone_lrs.index(lr)))
    chosen = load_model(candidates[best][1])
    save_model(chosen.module, out, chosen.spec)
    shown = ", ".join(f"{lr:g} -> {acc:.3f}" for lr, (acc, _) in candidates.items())
    logger.info("  learning rate %g (old model's validation accuracy by rate: %s)", best, shown)
    return best, {f"{lr:g}": acc for lr, (acc, _) in candidates.items()}


def train_forward(
    layout: DemoLayout,
    method: Method,
    source_train: str,
    target_train: str,
    target_model: str,
    scale: DemoScale,
    config: DemoConfig,
    name: str | None = None,
) -> str:
    """One forward transformation of ``method``'s recipe (FCT / FastFill, with or without side-information) from
    the space of ``source_train``'s embeddings to ``target_train``'s (the same train images; ``target_model`` is
    the target backbone, whose classifier FastFill's loss reads), trained at ``scale.transformation``. Written
    to ``models/NAME`` (default: the method's name); returns its URI."""
    recipe = get_recipe(method)
    name = name or method.value
    uri = layout.model(name)
    train_transformation(
        source_train,
        target_train,
        uri,
        new_model=target_model,
        side_info=recipe.side_info,
        uncertainty=recipe.uncertainty,
        hidden_dim=scale.hidden_dim,
        mixer_dim=scale.mixer_dim,
        version=name,
        train=train_config(name, layout, config, scale.transformation),
    )
    return uri


def train_transformations(
    layout: DemoLayout, old_train: str, new_train: str, new_model: str, scale: DemoScale, config: DemoConfig
) -> dict[str, str]:
    """FCT / FastFill transformations (with and without side-information) and psi, on the train split's old
    and new embeddings."""
    models = {
        method.value: train_forward(layout, method, old_train, new_train, new_model, scale, config)
        for method in TRANSFORMATIONS
    }
    models["psi"] = layout.model("psi")
    train_reverse(
        old_train,
        new_train,
        models["psi"],
        version="psi",
        train=train_config("psi", layout, config, scale.reverse),
    )
    return models
