"""Ray Train loops on a real local cluster: artefacts, resume from the latest checkpoint, data-parallel."""

import math

import numpy as np
import pytest
import ray
import torch

from raybackfill.compat.losses import synthesize_old_classifier
from raybackfill.data import storage
from raybackfill.data.schema import embedding_table
from raybackfill.data.synth import write_synthetic
from raybackfill.models.artifacts import load_model
from raybackfill.train.api import (
    old_features_by_id,
    train_backbone,
    train_side_info,
    train_transformation,
)
from raybackfill.train.trainer import Goal, Monitor, TrainConfig, epoch_order, shuffled_every_epoch


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("train") / "images")
    write_synthetic(uri, classes=4, per_class=8, size=16, seed=0)
    return uri


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> tuple[str, str]:
    """An old table with side-info and a new table whose vectors are a fixed function of them."""
    rng = np.random.default_rng(0)
    n, root = 256, tmp_path_factory.mktemp("emb")
    labels = rng.integers(0, 4, n)
    old = rng.normal(size=(n, 8)).astype(np.float32) + labels[:, None]
    side = rng.normal(size=(n, 4)).astype(np.float32)
    new = np.tanh(np.concatenate([old, side], 1) @ rng.normal(size=(12, 6))).astype(np.float32)
    old_uri, new_uri = str(root / "old"), str(root / "new")
    storage.write_table(
        embedding_table(np.arange(n), old, side_info=side, extra={"label": labels.astype(np.int32)}), old_uri
    )
    storage.write_table(embedding_table(np.arange(n), new), new_uri)
    return old_uri, new_uri


def _cfg(tmp_path, name, **kw) -> TrainConfig:
    return TrainConfig(name=name, storage_path=str(tmp_path / "runs"), seed=0, **kw)


def test_local_mode_backbone_artifact_embeds_images(ray_cluster, images, tmp_path):
    out = str(tmp_path / "old")
    spec = train_backbone(images, out, train=_cfg(tmp_path, "old", num_workers=0, epochs=1, batch_size=16))
    assert spec.dims == {"embedding": 128, "num_classes": 4} and spec.method == "independent"
    model = load_model(out).module
    assert model.embed(torch.zeros(2, 3, 16, 16)).shape == (2, 128)
    side = train_side_info(images, str(tmp_path / "side"), train=_cfg(tmp_path, "side", num_workers=0, epochs=1))
    assert side.dims == {"embedding": 32}


def test_a_seeded_backbone_run_reads_images_in_table_order_and_trains_the_same_model_twice(ray_cluster, tmp_path):
    # Several files and several decode blocks: decode tasks may finish in any order.
    uri = str(tmp_path / "images")
    write_synthetic(uri, classes=4, per_class=24, size=16, seed=1, rows_per_shard=16)
    states = []
    for run in ("a", "b"):
        train = _cfg(tmp_path, f"seeded-{run}", num_workers=0, epochs=2, batch_size=8)
        train_backbone(uri, str(tmp_path / run), train=train, backbone_kwargs={"width": 4})
        states.append(load_model(str(tmp_path / run)).module.state_dict())
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name


def test_backbone_training_augments_batches_only_when_asked(ray_cluster, images, tmp_path, monkeypatch):
    import raybackfill.train.loops as loops

    calls = []
    real = loops.augment
    monkeypatch.setattr(loops, "augment", lambda *a, **k: calls.append(1) or real(*a, **k))
    for augment in (True, False):
        calls.clear()
        train = _cfg(tmp_path, f"augment-{augment}", num_workers=0, epochs=1, batch_size=16)
        out = str(tmp_path / f"m-{augment}")
        train_backbone(images, out, train=train, backbone_kwargs={"width": 4}, augment=augment)
        assert len(calls) == (2 if augment else 0)  # 32 images in batches of 16


@pytest.mark.parametrize("method, term", [("bct", "bct_influence_loss"), ("ract", "ract_loss")])
def test_the_compatibility_term_is_in_the_loss_of_every_batch(ray_cluster, images, tmp_path, monkeypatch, method, term):
    # The loop once named the method's loss kind and the batch's loss tensor alike: from the second batch on,
    # the kind was a tensor and the compatibility term silently became zero.
    import raybackfill.train.loops as loops

    old = str(tmp_path / "old")
    train_backbone(images, old, train=_cfg(tmp_path, "compat-old", num_workers=0, epochs=1, batch_size=16),
                   backbone_kwargs={"width": 4}, augment=False)  # fmt: skip
    calls, steps = [], []
    real_term, real_step = getattr(loops.losses, term), loops.Worker.step
    monkeypatch.setattr(loops.losses, term, lambda *a, **k: calls.append(1) or real_term(*a, **k))
    monkeypatch.setattr(loops.Worker, "step", lambda self, loss: steps.append(1) or real_step(self, loss))
    train = _cfg(tmp_path, f"compat-{method}", num_workers=0, epochs=2, batch_size=8)
    train_backbone(images, str(tmp_path / method), method=method, old_model=old, train=train,
                   backbone_kwargs={"width": 4}, augment=False)  # fmt: skip
    assert len(steps) > 2 and len(calls) == len(steps)


def test_bct_class_means_do_not_depend_on_the_order_the_embed_job_wrote_rows_in():
    rng = np.random.default_rng(0)
    ids = np.arange(400)
    # Magnitudes from 1e-3 to 1e3: float32 sums of these come out differently in different orders.
    vectors = (rng.standard_normal((400, 8)) * 10.0 ** rng.uniform(-3, 3, (400, 1))).astype(np.float32)
    labels = ids % 4
    shuffled = rng.permutation(400)
    tables = [embedding_table(ids[rows], vectors[rows], extra={"label": labels[rows]}) for rows in (ids, shuffled)]
    (sorted_features, sorted_labels), (features, labels_out) = (old_features_by_id(t) for t in tables)
    assert torch.equal(features, sorted_features) and torch.equal(labels_out, sorted_labels)
    old_weight = torch.ones(2, 8)
    weight, _ = synthesize_old_classifier(old_weight, None, features, labels_out, num_classes_new=4)
    unsorted, _ = synthesize_old_classifier(
        old_weight, None, torch.from_numpy(vectors[shuffled]), torch.from_numpy(labels[shuffled]), 4
    )
    reference, _ = synthesize_old_classifier(old_weight, None, sorted_features, sorted_labels, 4)
    assert torch.equal(weight, reference)
    assert not torch.equal(unsorted, reference)  # the order did matter before the sort


def test_bct_and_ract_need_an_old_model(images, tmp_path):
    with pytest.raises(ValueError, match="pass old_model"):
        train_backbone(images, str(tmp_path / "m"), method="ract", train=_cfg(tmp_path, "r"))


def test_rerunning_a_finished_run_with_more_epochs_resumes_from_its_checkpoint(ray_cluster, embeddings, tmp_path):
    old_uri, new_uri = embeddings
    common = {"new_model": "unused", "side_info": True}
    first = train_transformation(old_uri, new_uri, str(tmp_path / "h1"), train=_cfg(tmp_path, "h", epochs=2), **common)
    second = train_transformation(old_uri, new_uri, str(tmp_path / "h2"), train=_cfg(tmp_path, "h", epochs=3), **common)
    assert first.kwargs == second.kwargs
    history = _history(tmp_path / "runs" / "h")
    assert [h["epoch"] for h in history] == [0, 1, 2]
    # The resumed run chose its epoch over all three, the two before the resume included.
    assert [h["epoch"] for h in second.training["history"]] == [0, 1, 2]
    losses = [h["val_loss"] for h in second.training["history"]]
    assert second.training["best_epoch"] == int(np.argmin(losses))


def test_two_workers_follow_the_loss_trajectory_of_one(ray_cluster, embeddings, tmp_path):
    old_uri, new_uri = embeddings
    losses = {}
    for workers in (1, 2):
        # No hold-out: the trajectories compare the same rows under 1 and 2 workers.
        cfg = _cfg(
            tmp_path,
            f"w{workers}",
            num_workers=workers,
            cpus_per_worker=0.5,
            epochs=4,
            batch_size=64,
            validation_fraction=0.0,
        )
        train_transformation(old_uri, new_uri, str(tmp_path / f"w{workers}"), new_model="unused", train=cfg)
        losses[workers] = [h["loss"] for h in _history(tmp_path / "runs" / f"w{workers}")]
    assert losses[1][-1] < losses[1][0] and losses[2][-1] < losses[2][0]
    np.testing.assert_allclose(losses[2], losses[1], rtol=0.25)


def _history(run_dir) -> list[dict]:
    checkpoints = sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    return torch.load(checkpoints[-1] / "state.pt", weights_only=True)["history"]


# ---- epoch order and epoch choice (pure) -------------------------------------------------------------------


def test_epoch_order_is_a_fresh_seeded_permutation_dealt_evenly_to_the_workers():
    one = epoch_order(10, seed=3, epoch=0, rank=0, world=1, shuffle=True)
    assert sorted(one) == list(range(10))
    assert np.array_equal(one, epoch_order(10, seed=3, epoch=0, rank=0, world=1, shuffle=True))
    assert not np.array_equal(one, epoch_order(10, seed=3, epoch=1, rank=0, world=1, shuffle=True))
    assert not np.array_equal(one, epoch_order(10, seed=4, epoch=0, rank=0, world=1, shuffle=True))
    # Three workers: the same permutation dealt rank::3, 10 // 3 = 3 rows each, disjoint.
    parts = [epoch_order(10, seed=3, epoch=0, rank=r, world=3, shuffle=True) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]
    assert np.array_equal(parts[1], one[1::3][:3])
    assert len(set(np.concatenate(parts))) == 9
    assert epoch_order(5, seed=0, epoch=7, rank=1, world=2, shuffle=False).tolist() == [1, 3]


def _chosen_by_brute_force(history: list[dict], monitor: Monitor) -> int:
    """The latest epoch whose score is within the best epoch's tolerance of the best (first best on ties)."""
    scores = [monitor.score(h) for h in history]
    best = int(np.argmax(scores))
    tolerance = monitor.tolerance(history[best])
    return max(i for i, s in enumerate(scores) if s >= scores[best] - tolerance)


def test_monitor_keeps_the_latest_epoch_within_a_standard_error_of_the_best():
    monitor = Monitor("val_accuracy", Goal.MAX, rows="val_rows")
    # best 0.80 on 100 rows: smoothed p = 81 / 102, se of a difference = sqrt(2 p (1 - p) / 100) = 0.0572,
    # so 0.75 ties and 0.74 does not
    accuracies = [0.5, 0.8, 0.77, 0.75, 0.74]
    history = [{"val_accuracy": a, "val_rows": 100} for a in accuracies]
    best, chosen = None, None
    for epoch, metrics in enumerate(history):
        best, is_chosen = monitor.update(best, epoch, metrics)
        chosen = epoch if is_chosen else chosen
    p = 81 / 102
    assert best["epoch"] == 1 and best["tolerance"] == pytest.approx(math.sqrt(2 * p * (1 - p) / 100))
    assert chosen == 3 == _chosen_by_brute_force(history, monitor)
    # A perfect epoch still has an error bar: one miss in 180 rows ties with it, two do not.
    perfect = monitor.update(None, 0, {"val_accuracy": 1.0, "val_rows": 180})[0]
    assert monitor.update(perfect, 1, {"val_accuracy": 179 / 180, "val_rows": 180})[1]
    assert not monitor.update(perfect, 1, {"val_accuracy": 178 / 180, "val_rows": 180})[1]


def test_monitor_online_choice_equals_the_brute_force_one():
    rng = np.random.default_rng(0)
    for goal, rows in ((Goal.MAX, "val_rows"), (Goal.MIN, None)):
        monitor = Monitor("m", goal, rows=rows)
        for _ in range(200):
            history = [{"m": float(v), "val_rows": 50} for v in rng.uniform(0.3, 0.9, rng.integers(1, 12)).round(2)]
            best, chosen = None, None
            for epoch, metrics in enumerate(history):
                best, is_chosen = monitor.update(best, epoch, metrics)
                chosen = epoch if is_chosen else chosen
            assert chosen == _chosen_by_brute_force(history, monitor)


def test_a_streamed_training_dataset_is_shuffled_anew_at_every_epoch(ray_cluster):
    def orders(ds, times):
        return [[row["id"] for row in ds.iter_rows()] for _ in range(times)]

    first, second = orders(shuffled_every_epoch(ray.data.range(200), seed=5), 2)
    assert sorted(first) == list(range(200)) and first != list(range(200))
    assert first != second  # a new permutation per execution
    assert orders(shuffled_every_epoch(ray.data.range(200), seed=5), 2) == [first, second]  # same seed, same orders
    assert orders(shuffled_every_epoch(ray.data.range(200), seed=6), 1)[0] != first


def test_collectives_run_on_the_workers_training_device(monkeypatch):
    """What NCCL needs, checked without a GPU: every tensor handed to all_reduce is on the worker's device."""
    import ray.train.torch

    import raybackfill.train.trainer as trainer

    reduced = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: reduced.append(t.device))
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    meter = trainer.RunningMean(torch.device("cpu"))
    meter.add(torch.tensor(2.0), 3)
    assert meter.value() == 2.0 and reduced == [torch.device("cpu")]
    # A worker training on a GPU: the meter built for it reduces there; a CPU tensor is refused.
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match="collective on cpu, but this worker trains on cuda:0"):
        trainer.RunningMean(torch.device("cpu")).value()
    with pytest.raises(RuntimeError, match="collective on cpu"):
        trainer.RunningMean().value()  # the default device is the CPU: the loops must pass theirs


def test_a_backbone_trains_with_two_workers(ray_cluster, images, tmp_path):
    out = str(tmp_path / "two")
    train = _cfg(tmp_path, "two-workers", num_workers=2, cpus_per_worker=0.5, epochs=2, batch_size=16)
    spec = train_backbone(images, out, train=train, backbone_kwargs={"width": 4}, augment=False)
    assert [h["epoch"] for h in spec.training["history"]] == [0, 1]
    assert all(0.0 <= h["train_accuracy"] <= 1.0 for h in spec.training["history"])
    assert load_model(out).module.embed(torch.zeros(2, 3, 16, 16)).shape == (2, 128)
