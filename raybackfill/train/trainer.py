"""Running a training loop on Ray Train V2: scaling, per-epoch checkpoints, resume after a kill.

A run is identified by ``(storage_path, name)``. Re-running the same command after a crash finds the
run's latest checkpoint and continues from the epoch after it, which is how a killed training job
resumes without redoing finished epochs. ``num_workers=0`` is Ray Train's local mode: the loop runs in
the driver with no worker start-up cost (seconds instead of tens of seconds on a 2-core box), which
suits tests and small demos, but its checkpoints are not persisted, so a killed local run starts over.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import ray
import torch
from ray.data import RandomSeedConfig
from ray.data.dataset import MaterializedDataset
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raybackfill.data import storage
from raybackfill.data.schema import ID

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
TRAIN = "train"
VALIDATION = "validation"


class Ingest(StrEnum):
    """How a worker reads a dataset. ``MEMORY``: a materialised dataset, read once into the worker's memory
    and re-permuted every epoch. ``STREAM``: a lazy dataset, globally shuffled by Ray Data every epoch and split
    between the workers."""

    MEMORY = "memory"
    STREAM = "stream"


@dataclass
class TrainConfig:
    """Where a run lives and how it scales. Defaults run on a laptop-sized local Ray cluster."""

    name: str
    storage_path: str = "./runs"
    num_workers: int = 1  # 0: Ray Train local mode (in the driver, no resume)
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = 1.0
    epochs: int = 5
    batch_size: int = 128  # global batch, split evenly over the workers
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    max_failures: int = 0
    # Share of the training rows held out (stratified by label where there is one) to pick the best epoch
    # and to tell whether a model learned; 0 trains on every row and keeps the last epoch.
    validation_fraction: float = 0.1
    max_validation_rows: int = 10_000
    # How workers read image data: None decides by size (materialised when it fits a quarter of the object
    # store), Ingest.MEMORY / Ingest.STREAM force one (see Ingest).
    ingest: Ingest | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be positive, got {self.epochs} and {self.batch_size}")


def cluster_has_gpus() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


class Goal(StrEnum):
    """Whether a larger or a smaller value of the monitored metric is better."""

    MAX = "max"
    MIN = "min"


@dataclass(frozen=True)
class Monitor:
    """The validation metric that picks a run's epoch, e.g. ``Monitor("val_accuracy", Goal.MAX, "val_rows")``.

    With ``rows`` (the metric that counts the validation rows) the metric is a proportion, and an epoch whose
    proportion is within one standard error of the difference between two proportions measured on those rows
    of the best one is taken as tied with it: the run keeps the *latest* of them. On a few hundred validation
    rows the single best epoch is mostly noise, and under a decaying learning rate a later epoch is the more
    converged model; an earlier epoch wins only when the validation split measurably prefers it (over-fitting).
    The proportion is Laplace-smoothed, (k + 1) / (n + 2), so a perfect epoch still has an error bar. Without
    ``rows`` the best value wins outright.
    """

    metric: str
    goal: Goal
    rows: str | None = None

    def score(self, metrics: dict[str, float]) -> float:
        """The metric, signed so that larger is better."""
        value = float(metrics[self.metric])
        return value if self.goal is Goal.MAX else -value

    def tolerance(self, metrics: dict[str, float]) -> float:
        """How far below the best epoch's score (whose ``metrics`` these are) another epoch still ties."""
        if self.rows is None:
            return 0.0
        n = max(float(metrics[self.rows]), 1.0)
        p = (float(metrics[self.metric]) * n + 1.0) / (n + 2.0)
        return math.sqrt(2.0 * p * (1.0 - p) / n)

    def update(self, best: dict | None, epoch: int, metrics: dict[str, float]) -> tuple[dict, bool]:
        """Fold one epoch in: returns the best epoch so far (``{"epoch", "score", "tolerance"}``) and whether
        this epoch is now the chosen one (the latest within tolerance of the best).

        Online and exact: if this epoch is the new best it is also the latest tied one; if the best did not
        change, the epoch chosen before stays valid and this one replaces it only when it ties with the best."""
        score = self.score(metrics)
        if best is None or score > best["score"]:
            best = {"epoch": epoch, "score": score, "tolerance": self.tolerance(metrics)}
        return best, score >= best["score"] - best["tolerance"]


def fit(
    loop: Callable[[dict], None],
    config: TrainConfig,
    loop_config: dict[str, Any],
    datasets: dict[str, ray.data.Dataset],
) -> dict[str, Any]:
    """Run ``loop`` on Ray Train and return the final state: ``model`` (the weights of the epoch validation
    chose when the loop monitors a validation metric, see :class:`Monitor`, else the last epoch's), ``history``
    and ``best_epoch`` (the chosen epoch).

    ``datasets`` maps names (``train``, optionally ``validation``) to datasets. A materialised dataset is
    held by every worker and re-permuted each epoch from ``(seed, epoch)``; a lazy one streams, and its
    ``train`` rows go through a seeded Ray Data shuffle that draws a new order at every epoch's execution.
    Either way no batch follows the table's row order, which on a table sorted by label would hold one class.
    """
    use_gpu = cluster_has_gpus() if config.use_gpu is None else config.use_gpu
    storage_filesystem, storage_path = None, config.storage_path
    if storage.is_s3(storage_path):
        storage_filesystem, storage_path = storage.resolve(storage_path)
    else:
        storage_path = os.path.abspath(storage_path)
    ingest = {name: _ingest_of(ds) for name, ds in datasets.items()}
    if TRAIN in datasets and ingest[TRAIN] is Ingest.STREAM:
        datasets = {**datasets, TRAIN: shuffled_every_epoch(datasets[TRAIN], config.seed)}
    trainer = TorchTrainer(
        loop,
        train_loop_config={
            **loop_config,
            "train": asdict(config),
            "use_gpu": use_gpu,
            "ingest": {name: mode.value for name, mode in ingest.items()},
        },
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(
            name=config.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
        datasets=datasets,  # type: ignore[arg-type]  # ray annotates an invariant dict where a Mapping would do
        dataset_config=_ordered_ingest([name for name, mode in ingest.items() if mode is Ingest.STREAM]),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {config.name!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = torch.load(os.path.join(directory, STATE_FILE), weights_only=True)
    _forget_local_checkpoint()
    chosen = state.get("chosen")
    return {
        "model": chosen["model"] if chosen else state["model"],
        "history": state["history"],
        "best_epoch": chosen["epoch"] if chosen else state["epoch"],
    }


def shuffled_every_epoch(ds: ray.data.Dataset, seed: int) -> ray.data.Dataset:
    """``ds`` globally shuffled, with a new permutation at each execution (Ray Train executes a training
    dataset once per epoch) drawn from ``seed`` and the execution's index: a fresh pipeline repeats the same
    sequence of orders. A resumed run restarts that sequence at its first order."""
    return ds.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))


def _ingest_of(ds: ray.data.Dataset) -> Ingest:
    return Ingest.MEMORY if isinstance(ds, MaterializedDataset) else Ingest.STREAM


def _ordered_ingest(split: list[str]) -> DataConfig:
    """The session's Ray Data options with ``preserve_order``: Train replaces a dataset's own execution
    options with its ingest options, and a seeded run must see its rows in the same order every time
    (exactly so with one worker or local mode; several workers still split the stream by who asks first).
    Only streamed datasets are split between workers; every worker reads the materialised ones whole.
    A copy, not ``DataConfig.default_ingest_options()``, which passes a deprecated field and warns."""
    options = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    options.preserve_order = True
    return DataConfig(datasets_to_split=split, execution_options=options)


# ---- helpers used inside training loops (they run in Ray Train workers) -------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Session:
    """One worker's view of a run: epochs to do, the per-epoch report with its checkpoint, the best epoch.

    A checkpoint holds the current weights and optimizer (to resume), the history of every epoch's metrics
    and, with a ``monitor``, the best epoch's score and the weights of the epoch chosen so far (see
    :meth:`Monitor.update`): a resumed run goes on choosing exactly as an uninterrupted one.
    """

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, epochs: int, monitor: Monitor | None = None
    ) -> None:
        self.model, self.optimizer, self.epochs, self.monitor = model, optimizer, epochs, monitor
        self.history: list[dict] = []
        self.best: dict | None = None  # the best epoch so far by the monitor: {"epoch", "score", "tolerance"}
        self.chosen: dict | None = None  # the epoch the run returns: {"epoch", "model"}
        self.start = 0
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                state = torch.load(os.path.join(directory, STATE_FILE), weights_only=True)
            unwrap(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            self.start, self.history = int(state["epoch"]) + 1, list(state["history"])
            self.best, self.chosen = state.get("best"), state.get("chosen")

    def remaining(self) -> range:
        return range(self.start, self.epochs)

    def end_epoch(self, epoch: int, metrics: dict[str, float], name: str = "") -> None:
        """Record and log an epoch's metrics and report them with a checkpoint (every rank must call this;
        rank 0 writes the checkpoint)."""
        self.history = [*self.history, {"epoch": epoch, **metrics}]
        if ray.train.get_context().get_world_rank() != 0:  # only rank 0's checkpoint becomes the result
            ray.train.report({"epoch": epoch, **metrics}, checkpoint=None)
            return
        weights = {k: v.detach().cpu().clone() for k, v in unwrap(self.model).state_dict().items()}
        if self.monitor is not None:
            self.best, chosen = self.monitor.update(self.best, epoch, metrics)
            if chosen:
                self.chosen = {"epoch": epoch, "model": weights}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        logger.info("%s epoch %d/%d: %s", name or "train", epoch + 1, self.epochs, shown)
        # Ray Train copies the directory to the run's storage and then deletes the local copy.
        directory = tempfile.mkdtemp(prefix="raybackfill-ckpt-")
        state = {
            "model": weights,
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch,
            "history": self.history,
            "best": self.best,
            "chosen": self.chosen,
        }
        torch.save(state, os.path.join(directory, STATE_FILE))
        ray.train.report(
            {"epoch": epoch, **metrics},
            checkpoint=Checkpoint.from_directory(directory),
            delete_local_checkpoint_after_upload=True,
        )
        if os.path.isdir(directory):
            # Local mode (num_workers=0) keeps the checkpoint where it was written and never uploads it:
            # keep only the latest one (it is the run's result) and delete it once fit() has read it.
            _forget_local_checkpoint()
            _LOCAL_CHECKPOINT.append(directory)


_LOCAL_CHECKPOINT: list[str] = []


def _forget_local_checkpoint() -> None:
    while _LOCAL_CHECKPOINT:
        shutil.rmtree(_LOCAL_CHECKPOINT.pop(), ignore_errors=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (checkpoints hold the plain module's state)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def shuffle_seed(seed: int, epoch: int) -> int:
    """The permutation seed of one epoch: a pure function of (seed, epoch), so a resumed run draws the
    same orders as an uninterrupted one."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


def epoch_order(n: int, *, seed: int, epoch: int, rank: int, world: int, shuffle: bool) -> np.ndarray:
    """Row positions one worker reads in one epoch.

    With ``shuffle`` a fresh permutation of all ``n`` rows, drawn from ``(seed, epoch)`` and dealt out
    ``rank::world``; without it the rows in order. Every worker gets ``n // world`` rows, so all workers
    take the same number of steps (DistributedDataParallel waits for every rank at each step).
    """
    rows = np.random.default_rng(shuffle_seed(seed, epoch)).permutation(n) if shuffle else np.arange(n)
    return rows[rank::world][: n // world]


class WorkerData:
    """A dataset as one worker reads it, epoch by epoch (see :class:`Ingest` and :func:`fit`)."""

    def __init__(self, name: str, ingest: Ingest, device: torch.device) -> None:
        self.name, self.ingest, self.device = name, ingest, device
        self.shard = ray.train.get_dataset_shard(name)
        self.columns: dict[str, torch.Tensor] | None = None
        if ingest is Ingest.MEMORY:
            self.columns = _read_whole(self.shard)

    def __len__(self) -> int:
        if self.columns is None:
            raise TypeError(f"dataset {self.name!r} streams: its length is not known to the worker")
        return len(next(iter(self.columns.values())))

    def batches(self, batch_size: int, *, seed: int, epoch: int, shuffle: bool) -> Iterator[dict[str, torch.Tensor]]:
        """This worker's batches of one epoch (``batch_size`` is the global batch, split over the workers).
        A last batch of one row is dropped: BatchNorm cannot train on it, and in-batch contrastive losses
        have nothing to contrast it with."""
        context = ray.train.get_context()
        world, rank = context.get_world_size(), context.get_world_rank()
        per_worker = max(batch_size // world, 1)
        if self.columns is None:
            batches = self.shard.iter_torch_batches(batch_size=per_worker, device=self.device)
        else:
            order = torch.from_numpy(
                epoch_order(len(self), seed=seed, epoch=epoch, rank=rank, world=world, shuffle=shuffle)
            )
            batches = (
                {k: v[order[i : i + per_worker]].to(self.device) for k, v in self.columns.items()}
                for i in range(0, len(order), per_worker)
            )
        for batch in batches:
            if len(next(iter(batch.values()))) > 1:
                yield batch


def _read_whole(shard) -> dict[str, torch.Tensor]:
    """Every row of a materialised dataset as CPU tensors, sorted by id when it has one: the rows' order then
    does not depend on which decode task finished first, so a seeded permutation of them is reproducible."""
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in shard.iter_torch_batches(batch_size=4096, device="cpu"):
        for name, values in batch.items():
            parts.setdefault(name, []).append(values)
    columns = {name: torch.cat(chunks) for name, chunks in parts.items()}
    if ID in columns:
        order = torch.argsort(columns.pop(ID), stable=True)
        columns = {name: values[order] for name, values in columns.items()}
    return columns


class RunningMean:
    """Mean of a per-batch value weighted by batch size, summed over workers at the end of an epoch.

    The sums live on the worker's training device: NCCL, Ray Train's backend on GPU workers, all-reduces
    only CUDA tensors."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device if device is not None else torch.device("cpu")
        self.total = 0.0
        self.count = 0.0

    def add(self, value: torch.Tensor | float, n: int) -> None:
        self.total += float(value.detach() if isinstance(value, torch.Tensor) else value) * n
        self.count += n

    def _reduced(self) -> tuple[float, float]:
        stats = torch.tensor([self.total, self.count], dtype=torch.float64, device=self.device)
        all_reduce(stats)
        return float(stats[0]), float(stats[1])

    def value(self) -> float:
        total, count = self._reduced()
        return total / max(count, 1.0)

    def total_count(self) -> float:
        """Rows added on every worker."""
        return self._reduced()[1]


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the workers in place (a no-op outside a distributed run).

    Refuses a tensor that is not on the worker's training device: gloo (CPU workers) reduces any tensor, but
    NCCL (GPU workers) only CUDA ones, so a CPU tensor here would pass every CPU test and fail on a GPU
    cluster after the first epoch."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        device = ray.train.torch.get_device()
        if tensor.device != device:
            raise RuntimeError(f"collective on {tensor.device}, but this worker trains on {device}")
        torch.distributed.all_reduce(tensor)
    return tensor
