"""Running a training loop on Ray Train V2: scaling, per-epoch checkpoints, resume after a kill.

A run is identified by ``(storage_path, name)``. Re-running the same command after a crash finds the
run's latest checkpoint and continues from the epoch after it, which is how a killed training job
resumes without redoing finished epochs. ``num_workers=0`` is Ray Train's local mode: the loop runs in
the driver with no worker start-up cost (seconds instead of tens of seconds on a 2-core box), which
suits tests and small demos, but its checkpoints are not persisted, so a killed local run starts over.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raybackfill.data import io

STATE_FILE = "state.pt"


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


def cluster_has_gpus() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def fit(
    loop: Callable[[dict], None],
    config: TrainConfig,
    loop_config: dict[str, Any],
    datasets: dict[str, ray.data.Dataset],
) -> dict[str, Any]:
    """Run ``loop`` on Ray Train and return the final state (``model`` state_dict and ``history``)."""
    use_gpu = cluster_has_gpus() if config.use_gpu is None else config.use_gpu
    storage_filesystem, storage_path = None, config.storage_path
    if io.is_s3(storage_path):
        storage_filesystem, storage_path = io.resolve(storage_path)
    else:
        storage_path = os.path.abspath(storage_path)
    trainer = TorchTrainer(
        loop,
        train_loop_config={**loop_config, "train": asdict(config), "use_gpu": use_gpu},
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
        datasets=datasets,
        dataset_config=_ordered_ingest(),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {config.name!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = torch.load(os.path.join(directory, STATE_FILE), weights_only=True)
    _forget_local_checkpoint()
    return state


def _ordered_ingest() -> DataConfig:
    """The session's Ray Data options with ``preserve_order``: Train replaces a dataset's own execution
    options with its ingest options, and a seeded run must see its rows in the same order every time
    (exactly so with one worker or local mode; several workers still split the stream by who asks first).
    A copy, not ``DataConfig.default_ingest_options()``, which passes a deprecated field and warns."""
    options = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    options.preserve_order = True
    return DataConfig(execution_options=options)


# ---- helpers used inside training loops (they run in Ray Train workers) -------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    """Load the latest checkpoint of this run, if any: returns (first epoch to run, metrics history)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as directory:
        state = torch.load(os.path.join(directory, STATE_FILE), weights_only=True)
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]) + 1, list(state["history"])


def report_epoch(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int, history: list[dict], metrics: dict
) -> list[dict]:
    """Report an epoch's metrics with a checkpoint (written by rank 0; every rank must call this).

    Returns the history including this epoch.
    """
    history = [*history, {"epoch": epoch, **metrics}]
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report({"epoch": epoch, **metrics}, checkpoint=None)
        return history
    # Ray Train copies the directory to the run's storage and then deletes the local copy.
    directory = tempfile.mkdtemp(prefix="raybackfill-ckpt-")
    state = {
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "history": history,
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
    return history


_LOCAL_CHECKPOINT: list[str] = []


def _forget_local_checkpoint() -> None:
    while _LOCAL_CHECKPOINT:
        shutil.rmtree(_LOCAL_CHECKPOINT.pop(), ignore_errors=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (checkpoints hold the plain module's state)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class RunningMean:
    """Mean of a per-batch loss weighted by batch size, all-reduced over workers at the end of an epoch."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def add(self, value: torch.Tensor, n: int) -> None:
        self.total += float(value.detach()) * n
        self.count += n

    def value(self) -> float:
        stats = torch.tensor([self.total, float(self.count)], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        return float(stats[0] / max(stats[1], 1.0))
