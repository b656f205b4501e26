"""Training loops that run inside Ray Train workers, one per kind of model.

Each loop reads its data with ``ray.train.get_dataset_shard("train")``, trains for the configured epochs
and reports a checkpoint per epoch (see :mod:`raybackfill.train.trainer`). Frozen models a loss needs
(the old backbone for RACT) are loaded from their artefact inside the worker; small frozen tensors (the
old or new classifier) travel in the loop config.
"""

from __future__ import annotations

import math

import ray.train
import ray.train.torch
import torch

from raybackfill.compat import losses
from raybackfill.models.artifacts import load_model
from raybackfill.models.registry import build_model
from raybackfill.models.side_info import AugmentConfig, augment
from raybackfill.train.trainer import RunningMean, TrainConfig, report_epoch, restore, seed_everything

# Mild augmentation for supervised backbones (SimCLR's strong views are for the side-info model only).
SUPERVISED_AUGMENT = AugmentConfig(crop_scale=(0.6, 1.0), brightness=0.2, contrast=0.2, saturation=0.2, grayscale_p=0.0)


def _setup(config: dict) -> tuple[TrainConfig, torch.nn.Module, torch.optim.Optimizer, int, list[dict]]:
    train = TrainConfig(**config["train"])
    seed_everything(train.seed)
    model = build_model(config["architecture"], **config["kwargs"])
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    start, history = restore(model, optimizer)
    return train, model, optimizer, start, history


def _set_lr(optimizer: torch.optim.Optimizer, train: TrainConfig, epoch: int) -> None:
    """Cosine schedule by epoch: a pure function of the epoch, so a resumed run continues it exactly."""
    lr = 0.5 * train.lr * (1 + math.cos(math.pi * epoch / max(train.epochs, 1)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def _batches(train: TrainConfig, epoch: int):
    world = ray.train.get_context().get_world_size()
    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard("train")
    return shard.iter_torch_batches(
        batch_size=max(train.batch_size // world, 1),
        local_shuffle_buffer_size=4 * train.batch_size,
        local_shuffle_seed=train.seed * 100_003 + epoch * 101 + rank,
        device=ray.train.torch.get_device(),
    )


def _generator(train: TrainConfig, epoch: int) -> torch.Generator:
    rank = ray.train.get_context().get_world_rank()
    return torch.Generator().manual_seed(train.seed * 1_000_003 + epoch * 1009 + rank)


def backbone_loop(config: dict) -> None:
    """independent / bct / ract: classification loss plus the method's compatibility term."""
    train, model, optimizer, start, history = _setup(config)
    method = config["method"]
    device = ray.train.torch.get_device()
    old_model = None
    if method == "ract":
        old_model = load_model(config["old_model"]).module.to(device).eval()
        for p in old_model.parameters():
            p.requires_grad_(False)
    if method == "bct":
        old_weight = torch.as_tensor(config["old_classifier_weight"], device=device)
        old_bias = torch.as_tensor(config["old_classifier_bias"], device=device)
    for epoch in range(start, train.epochs):
        _set_lr(optimizer, train, epoch)
        model.train()
        meters = {"loss": RunningMean(), "ce": RunningMean(), "compat": RunningMean()}
        generator = _generator(train, epoch)
        for batch in _batches(train, epoch):
            images = batch["pixels"]
            if config["augment"]:
                images = augment(images, SUPERVISED_AUGMENT, generator)
            labels = batch["label"].long()
            features, logits = model(images)
            ce = losses.classification_loss(logits, labels)
            if method == "bct":
                compat = losses.bct_influence_loss(features, labels, old_weight, old_bias)
            elif method == "ract":
                with torch.no_grad():
                    old_features = old_model.embed(images)
                compat = losses.ract_loss(features, old_features, labels, config["tau"], config["k"])
            else:
                compat = torch.zeros((), device=device)
            loss = ce + config["compat_weight"] * compat
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = len(labels)
            meters["loss"].add(loss, n)
            meters["ce"].add(ce, n)
            meters["compat"].add(compat, n)
        history = report_epoch(model, optimizer, epoch, history, {k: m.value() for k, m in meters.items()})


def side_info_loop(config: dict) -> None:
    """SimCLR: NT-Xent between two augmented views of each image; labels are not used."""
    train, model, optimizer, start, history = _setup(config)
    for epoch in range(start, train.epochs):
        _set_lr(optimizer, train, epoch)
        model.train()
        meter = RunningMean()
        generator = _generator(train, epoch)
        for batch in _batches(train, epoch):
            images = batch["pixels"]
            _, z1 = model(augment(images, generator=generator))
            _, z2 = model(augment(images, generator=generator))
            loss = losses.nt_xent_loss(z1, z2, config.get("tau", 0.5))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            meter.add(loss, len(images))
        history = report_epoch(model, optimizer, epoch, history, {"loss": meter.value()})


def transformation_loop(config: dict) -> None:
    """FCT (MSE to the new embedding) or FastFill (uncertainty-weighted MSE + CE through the frozen new
    classifier) on stored embeddings: rows of ``old``, optional ``side``, ``new`` and ``label``."""
    train, model, optimizer, start, history = _setup(config)
    device = ray.train.torch.get_device()
    fastfill = config["architecture"] == "fastfill_transformation"
    if fastfill:
        new_weight = torch.as_tensor(config["new_classifier_weight"], device=device)
        new_bias = torch.as_tensor(config["new_classifier_bias"], device=device)
    for epoch in range(start, train.epochs):
        _set_lr(optimizer, train, epoch)
        model.train()
        meters = {"loss": RunningMean(), "mse": RunningMean()}
        for batch in _batches(train, epoch):
            side = batch.get("side")
            if fastfill:
                h, s = model(batch["old"], side)
                loss = losses.fastfill_loss(h, s, batch["new"], batch["label"].long(), new_weight, new_bias)
            else:
                h = model(batch["old"], side)
                loss = losses.fct_loss(batch["new"], h)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = len(h)
            meters["loss"].add(loss, n)
            meters["mse"].add(losses.fct_loss(batch["new"], h), n)
        history = report_epoch(model, optimizer, epoch, history, {k: m.value() for k, m in meters.items()})


def reverse_loop(config: dict) -> None:
    """psi: new -> old with the metric-compatible contrastive loss (the new model stays frozen)."""
    train, model, optimizer, start, history = _setup(config)
    for epoch in range(start, train.epochs):
        _set_lr(optimizer, train, epoch)
        model.train()
        meter = RunningMean()
        for batch in _batches(train, epoch):
            new = batch["new"]
            loss = losses.metric_compatible_loss(
                model(new), batch["old"], new.detach(), batch["label"].long(), config.get("tau", 0.05)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            meter.add(loss, len(new))
        history = report_epoch(model, optimizer, epoch, history, {"loss": meter.value()})
