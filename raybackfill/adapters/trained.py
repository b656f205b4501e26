"""Adapters trained on Ray Train: the FCT MLP (old -> new) or psi's MLP (new -> old) with a label-free loss,
and the FCT MLP with FastFill's uncertainty head on that loss.

The loop runs in Ray Train workers through the same machinery as every other model
(:func:`raybackfill.train.trainer.fit`: scaling, per-epoch checkpoints, resume by run name, the epoch chosen on
validation rows). Its rows are ``x`` (the adapter's input), ``y`` (the true embedding of the other space) and,
for an old -> new adapter given side-information, ``side``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from raybackfill.adapters import losses
from raybackfill.data.schema import ID, LABEL, fixed_size_list
from raybackfill.train.api import table_datasets, training_summary
from raybackfill.train.loops import Worker
from raybackfill.train.trainer import Goal, Monitor, RunningMean, TrainConfig, fit
from raybackfill.types import AdapterLoss

X, Y, SIDE = "x", "y", "side"
REVERSE_ARCHITECTURE = "reverse_transformation"


def adapter_loop(config: dict) -> None:
    """Minimise the label-free loss (:mod:`raybackfill.adapters.losses`) of the adapter's output against the true
    embedding; with ``uncertainty`` the FastFill head learns each item's error. The run keeps the epoch with the
    lowest validation loss."""
    worker = Worker(config, Monitor("val_loss", Goal.MIN))
    model, kind, uncertainty = worker.model, AdapterLoss(config["loss"]), bool(config["uncertainty"])
    reverse = config["architecture"] == REVERSE_ARCHITECTURE

    def losses_of(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        out = model(batch[X]) if reverse else model(batch[X], batch.get(SIDE))
        h, s = out if uncertainty else (out, None)
        error = losses.adapter_loss(h, batch[Y], kind)
        loss = error if s is None else losses.uncertainty_loss(h, s, batch[Y], kind)
        return loss, error, len(h)

    def score(batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
        loss, error, n = losses_of(batch)
        return {"loss": (loss, n), "error": (error, n)}

    for epoch in worker.epochs():
        meters = {"loss": RunningMean(worker.device), "error": RunningMean(worker.device)}
        for batch in worker.batches(epoch):
            loss, error, n = losses_of(batch)
            worker.step(loss)
            meters["loss"].add(loss, n)
            meters["error"].add(error, n)
        worker.end_epoch(epoch, {k: m.value() for k, m in meters.items()} | worker.validate(score))


def training_table(
    ids: np.ndarray, x: np.ndarray, y: np.ndarray, side: np.ndarray | None, labels: np.ndarray | None
) -> pa.Table:
    """The loop's rows as an Arrow table (labels only stratify the validation split)."""
    columns = {ID: pa.array(np.asarray(ids, dtype=np.int64)), X: fixed_size_list(x), Y: fixed_size_list(y)}
    if side is not None:
        columns[SIDE] = fixed_size_list(side)
    if labels is not None:
        columns[LABEL] = pa.array(np.asarray(labels, dtype=np.int64))
    return pa.table(columns)


def train_mlp(
    architecture: str,
    kwargs: dict,
    table: pa.Table,
    *,
    loss: AdapterLoss,
    uncertainty: bool,
    train: TrainConfig,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Train ``architecture(**kwargs)`` on ``table`` (see :func:`training_table`) with Ray Train.

    Returns:
        The chosen epoch's weights and the run's training summary (as model.json records it).
    """
    config = {
        "architecture": architecture,
        "kwargs": kwargs,
        "loss": AdapterLoss(loss).value,
        "uncertainty": uncertainty,
        "name": f"adapter {architecture}",
    }
    state = fit(adapter_loop, train, config, table_datasets(table, train))
    return state["model"], training_summary(state)
