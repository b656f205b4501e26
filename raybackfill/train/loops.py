"""Training loops that run inside Ray Train workers, one per kind of model.

Each loop reads its rows through :class:`~raybackfill.train.trainer.WorkerData` (a fresh seeded order every
epoch), trains for the configured epochs and ends each epoch with a checkpoint (see
:mod:`raybackfill.train.trainer`). When the run has a ``validation`` dataset (carved from the training rows by
:mod:`raybackfill.train.api`), each epoch is also scored on it and the best epoch is what the run returns.
Frozen models a loss needs (the old backbone for RACT) are loaded from their artefact inside the worker; small
frozen tensors (the old or new classifier) travel in the loop config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import ray.train
import ray.train.torch
import torch

from raybackfill.compat import losses
from raybackfill.logs import configure_logging
from raybackfill.models.artifacts import load_model
from raybackfill.models.registry import build_model
from raybackfill.models.side_info import AugmentConfig, augment
from raybackfill.train.trainer import (
    TRAIN,
    VALIDATION,
    Goal,
    Ingest,
    Monitor,
    RunningMean,
    Session,
    TrainConfig,
    WorkerData,
    seed_everything,
)
from raybackfill.types import BackboneLoss

# Mild augmentation for supervised backbones (SimCLR's strong views are for the side-info model only).
SUPERVISED_AUGMENT = AugmentConfig(crop_scale=(0.6, 1.0), brightness=0.2, contrast=0.2, saturation=0.2, grayscale_p=0.0)


class Worker:
    """What every loop sets up: config, device, model, optimizer, its datasets and the session."""

    def __init__(self, config: dict, monitor: Monitor | None) -> None:
        configure_logging()  # per-epoch lines reach the driver through the worker's stderr
        self.config = config
        self.train = TrainConfig(**config["train"])
        seed_everything(self.train.seed)
        self.device = ray.train.torch.get_device()
        self.model = ray.train.torch.prepare_model(build_model(config["architecture"], **config["kwargs"]))
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.train.lr, weight_decay=self.train.weight_decay
        )
        self.data = {name: WorkerData(name, Ingest(mode), self.device) for name, mode in config["ingest"].items()}
        self.has_validation = VALIDATION in self.data
        self.session = Session(self.model, self.optimizer, self.train.epochs, monitor if self.has_validation else None)

    def epochs(self) -> Iterator[int]:
        for epoch in self.session.remaining():
            _set_lr(self.optimizer, self.train, epoch)
            self.model.train()
            yield epoch

    def batches(self, epoch: int, name: str = TRAIN) -> Iterator[dict[str, torch.Tensor]]:
        """Training batches in a fresh order per epoch; validation batches in a fixed order."""
        return self.data[name].batches(self.train.batch_size, seed=self.train.seed, epoch=epoch, shuffle=name == TRAIN)

    def generator(self, epoch: int) -> torch.Generator:
        rank = ray.train.get_context().get_world_rank()
        return torch.Generator().manual_seed(self.train.seed * 1_000_003 + epoch * 1009 + rank)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def meters(self, *names: str) -> dict[str, RunningMean]:
        return {name: RunningMean(self.device) for name in names}

    def validate(
        self, score: Callable[[dict[str, torch.Tensor]], Mapping[str, tuple[torch.Tensor | float, int]]]
    ) -> dict:
        """``val_<name>`` means over the validation rows of what ``score(batch)`` returns as (value, n) pairs,
        and ``val_rows`` (none without a validation dataset). The model is in eval mode, without gradients."""
        if not self.has_validation:
            return {}
        self.model.eval()
        meters: dict[str, RunningMean] = {}
        with torch.no_grad():
            for batch in self.batches(0, VALIDATION):
                for name, (value, n) in score(batch).items():
                    meters.setdefault(name, RunningMean(self.device)).add(value, n)
        self.model.train()
        rows = next(iter(meters.values())).total_count() if meters else 0.0
        return {f"val_{name}": meter.value() for name, meter in meters.items()} | {"val_rows": rows}

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.session.end_epoch(epoch, metrics, self.config.get("name", ""))


def _set_lr(optimizer: torch.optim.Optimizer, train: TrainConfig, epoch: int) -> None:
    """Cosine schedule by epoch: a pure function of the epoch, so a resumed run continues it exactly."""
    lr = 0.5 * train.lr * (1 + math.cos(math.pi * epoch / max(train.epochs, 1)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def correct(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose arg-max class is the label."""
    return float((logits.argmax(dim=1) == labels).float().mean()) if len(labels) else 0.0


def backbone_loop(config: dict) -> None:
    """independent / bct / ract: classification loss plus the method's compatibility term. With a validation
    split, the run keeps the latest epoch within a standard error of the best validation accuracy."""
    worker = Worker(config, Monitor("val_accuracy", Goal.MAX, rows="val_rows"))
    model, device, backbone_loss = worker.model, worker.device, config["backbone_loss"]
    old_model = None
    if backbone_loss is BackboneLoss.RACT:
        old_model = load_model(config["old_model"]).module.to(device).eval()
        for p in old_model.parameters():
            p.requires_grad_(False)
    if backbone_loss is BackboneLoss.BCT:
        old_weight = torch.as_tensor(config["old_classifier_weight"], device=device)
        old_bias = torch.as_tensor(config["old_classifier_bias"], device=device)

    def score(batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor | float, int]]:
        labels = batch["label"].long()
        _, logits = model(batch["pixels"])
        n = len(labels)
        return {"accuracy": (correct(logits, labels), n), "ce": (losses.classification_loss(logits, labels), n)}

    for epoch in worker.epochs():
        meters = worker.meters("loss", "ce", "compat", "train_accuracy")
        generator = worker.generator(epoch)
        for batch in worker.batches(epoch):
            images = batch["pixels"]
            if config["augment"]:
                images = augment(images, SUPERVISED_AUGMENT, generator)
            labels = batch["label"].long()
            features, logits = model(images)
            ce = losses.classification_loss(logits, labels)
            if backbone_loss is BackboneLoss.BCT:
                compat = losses.bct_influence_loss(features, labels, old_weight, old_bias)
            elif backbone_loss is BackboneLoss.RACT:
                assert old_model is not None  # loaded above for RACT
                with torch.no_grad():
                    old_features = old_model.embed(images)  # type: ignore[operator]  # torch: Module.__getattr__
                compat = losses.ract_loss(features, old_features, labels, config["tau"], config["k"])
            else:
                compat = torch.zeros((), device=device)
            loss = ce + config["compat_weight"] * compat
            worker.step(loss)
            n = len(labels)
            meters["loss"].add(loss, n)
            meters["ce"].add(ce, n)
            meters["compat"].add(compat, n)
            meters["train_accuracy"].add(correct(logits, labels), n)
        worker.end_epoch(epoch, {k: m.value() for k, m in meters.items()} | worker.validate(score))


def side_info_loop(config: dict) -> None:
    """SimCLR: NT-Xent between two augmented views of each image; labels are not used. The best epoch has the
    lowest NT-Xent on the validation images (views drawn from one fixed generator, so epochs compare)."""
    worker = Worker(config, Monitor("val_loss", Goal.MIN))
    model, tau = worker.model, config.get("tau", 0.5)

    def nt_xent(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        _, z1 = model(augment(images, generator=generator))
        _, z2 = model(augment(images, generator=generator))
        return losses.nt_xent_loss(z1, z2, tau)

    for epoch in worker.epochs():
        meter = RunningMean(worker.device)
        generator = worker.generator(epoch)
        for batch in worker.batches(epoch):
            loss = nt_xent(batch["pixels"], generator)
            worker.step(loss)
            meter.add(loss, len(batch["pixels"]))
        views = torch.Generator().manual_seed(worker.train.seed)  # the same validation views every epoch

        def val_loss(b: dict[str, torch.Tensor], g: torch.Generator = views) -> dict[str, tuple[torch.Tensor, int]]:
            return {"loss": (nt_xent(b["pixels"], g), len(b["pixels"]))}

        validation = worker.validate(val_loss)
        worker.end_epoch(epoch, {"loss": meter.value()} | validation)


def transformation_loop(config: dict) -> None:
    """FCT (MSE to the new embedding) or FastFill (uncertainty-weighted MSE + CE through the frozen new
    classifier) on stored embeddings: rows of ``old``, optional ``side``, ``new`` and ``label``. The best
    epoch has the lowest validation loss."""
    worker = Worker(config, Monitor("val_loss", Goal.MIN))
    model, device = worker.model, worker.device
    fastfill = config["architecture"] == "fastfill_transformation"
    if fastfill:
        new_weight = torch.as_tensor(config["new_classifier_weight"], device=device)
        new_bias = torch.as_tensor(config["new_classifier_bias"], device=device)

    def losses_of(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        side = batch.get("side")
        if fastfill:
            h, s = model(batch["old"], side)
            loss = losses.fastfill_loss(h, s, batch["new"], batch["label"].long(), new_weight, new_bias)
        else:
            h = model(batch["old"], side)
            loss = losses.fct_loss(batch["new"], h)
        return loss, losses.fct_loss(batch["new"], h), len(h)

    def score(batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
        loss, mse, n = losses_of(batch)
        return {"loss": (loss, n), "mse": (mse, n)}

    for epoch in worker.epochs():
        meters = worker.meters("loss", "mse")
        for batch in worker.batches(epoch):
            loss, mse, n = losses_of(batch)
            worker.step(loss)
            meters["loss"].add(loss, n)
            meters["mse"].add(mse, n)
        worker.end_epoch(epoch, {k: m.value() for k, m in meters.items()} | worker.validate(score))


def reverse_loop(config: dict) -> None:
    """psi: new -> old with the metric-compatible contrastive loss (the new model stays frozen). The best
    epoch has the lowest validation loss."""
    worker = Worker(config, Monitor("val_loss", Goal.MIN))
    model, tau = worker.model, config.get("tau", 0.05)

    def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        new = batch["new"]
        return losses.metric_compatible_loss(model(new), batch["old"], new.detach(), batch["label"].long(), tau)

    for epoch in worker.epochs():
        meter = RunningMean(worker.device)
        for batch in worker.batches(epoch):
            loss = loss_of(batch)
            worker.step(loss)
            meter.add(loss, len(batch["new"]))
        validation = worker.validate(lambda b: {"loss": (loss_of(b), len(b["new"]))})
        worker.end_epoch(epoch, {"loss": meter.value()} | validation)
