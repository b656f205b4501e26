"""Fit each kind of model on Ray Train and save it as a versioned artefact.

Backbones and the side-information model read images through Ray Data; transformations train on
embedding tables computed once (old, side-info, new), never by re-running backbones every epoch. Every run
holds out a validation share of its training rows (``TrainConfig.validation_fraction``) that picks its best
epoch; model.json records that epoch's training and validation figures (``ModelSpec.training``).
"""

from __future__ import annotations

import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from raybackfill.compat.losses import synthesize_old_classifier
from raybackfill.compat.recipes import RECIPES, get_recipe
from raybackfill.data import storage
from raybackfill.data.loading import keep_only, prepare_rows, probe_image_size, read_gallery
from raybackfill.data.preprocessing import ImagePreprocessing
from raybackfill.data.schema import EMBEDDING, ID, IMAGE, LABEL, SIDE_INFO, validate_embedding_table, vectors_of
from raybackfill.data.splits import holdout
from raybackfill.embed.pipeline import embed_gallery
from raybackfill.models.artifacts import ModelSpec, load_model, save_model
from raybackfill.models.registry import build_model
from raybackfill.train import loops
from raybackfill.train.quality import majority_share
from raybackfill.train.trainer import TRAIN, VALIDATION, Ingest, TrainConfig, fit
from raybackfill.types import BackboneLoss, Method, parse


def training_preprocessing(images_uri: str, image_size: int | None = None) -> ImagePreprocessing:
    """How a model raybackfill trains prepares images: ``image_size`` (default: the shorter side of the table's
    first image) is the size every image is resized and centre-cropped to, with the fixed 0.5/0.25 normalisation.
    Recorded in the model's model.json, so galleries of any size are later prepared the same way."""
    return ImagePreprocessing(crop=image_size or probe_image_size(images_uri))


def image_datasets(
    images_uri: str, train: TrainConfig, preprocessing: ImagePreprocessing | None = None
) -> tuple[dict[str, ray.data.Dataset], np.ndarray]:
    """Decoded training images (:func:`training_preprocessing`), split into ``train`` and (when
    ``train.validation_fraction`` > 0) ``validation`` rows: a stratified, seeded hold-out of the table (see
    :func:`raybackfill.data.splits.holdout`). Returns the datasets and the labels of the validation rows (read
    from the table, not the datasets).

    A part small enough is decoded once and materialised in the object store, so epochs neither re-read nor
    re-decode it and each worker permutes it afresh every epoch; a larger one streams and is shuffled by Ray Data
    every epoch (see :func:`raybackfill.train.trainer.fit`). The decision uses the cluster's total object store,
    not what happens to be free. Rows keep their ids, which fix the order a seeded permutation starts from.
    """
    preprocessing = preprocessing or training_preprocessing(images_uri)
    size = preprocessing.output_size
    labelled = storage.read_table(images_uri, columns=[ID, LABEL])
    ids, labels = labelled.column(ID).to_numpy(), labelled.column(LABEL).to_numpy()
    held_out = holdout(ids, labels, train.validation_fraction, max_rows=train.max_validation_rows, seed=train.seed)
    parts = {TRAIN: np.sort(ids[~held_out])}
    if held_out.any():
        parts[VALIDATION] = np.sort(ids[held_out])
    budget = 0.25 * ray.cluster_resources().get("object_store_memory", 0)
    datasets = {}
    for name, keep in parts.items():
        ds = keep_only(read_gallery(images_uri, require_label=True).select_columns([ID, IMAGE, LABEL]), keep)
        ds = prepare_rows(ds, {"pixels": preprocessing}).select_columns([ID, "pixels", LABEL])
        ds.context.execution_options.preserve_order = True
        fits = len(keep) * 3 * size * size * 4 < budget
        if train.ingest is Ingest.MEMORY or (train.ingest is None and fits):
            ds = ds.materialize()
        datasets[name] = ds
    return datasets, labels[held_out]


def table_datasets(table: pa.Table, train: TrainConfig) -> dict[str, ray.data.Dataset]:
    """An in-memory table of embeddings as ``train`` and (stratified by label) ``validation`` datasets."""
    held_out = holdout(
        table.column(ID).to_numpy(),
        table.column(LABEL).to_numpy() if LABEL in table.schema.names else None,
        train.validation_fraction,
        max_rows=train.max_validation_rows,
        seed=train.seed,
    )
    parts = {TRAIN: table.filter(pa.array(~held_out))}
    if held_out.any():
        parts[VALIDATION] = table.filter(pa.array(held_out))
    return {name: ray.data.from_arrow(part) for name, part in parts.items()}


def training_summary(state: dict, validation_labels: np.ndarray | None = None) -> dict:
    """What model.json records of a run: epochs, the chosen (best) epoch and its metrics, every epoch's
    metrics, and for classifiers the validation rows and the accuracy of always guessing the largest class."""
    history = state["history"]
    best = state["best_epoch"]
    chosen = next((h for h in history if h["epoch"] == best), history[-1])
    summary = {
        "epochs": len(history),
        "best_epoch": int(best),
        **{k: float(v) for k, v in chosen.items() if k != "epoch"},
        "history": [{k: (int(v) if k == "epoch" else round(float(v), 6)) for k, v in h.items()} for h in history],
    }
    if validation_labels is not None and len(validation_labels):
        summary["validation_rows"] = int(len(validation_labels))
        summary["chance_accuracy"] = majority_share(validation_labels)
    return summary


def _num_classes(images_uri: str) -> int:
    labels = storage.read_table(images_uri, columns=[LABEL]).column(LABEL)
    return int(pc.max(labels).as_py()) + 1


def _save(
    state: dict,
    architecture: str,
    kwargs: dict,
    out_uri: str,
    *,
    preprocessing: ImagePreprocessing | None = None,
    **spec_fields,
) -> ModelSpec:
    """Save a trained model; an image model records the preprocessing it was trained with."""
    if preprocessing is not None:
        spec_fields["preprocessing"] = preprocessing.to_dict()
    module = build_model(architecture, **kwargs)
    module.load_state_dict(state["model"])
    spec = ModelSpec(architecture=architecture, kwargs=kwargs, **spec_fields)
    return save_model(module, out_uri, spec)


def train_backbone(
    images_uri: str,
    out_uri: str,
    *,
    method: Method = Method.INDEPENDENT,
    architecture: str = "small_cnn",
    embedding_dim: int = 128,
    num_classes: int | None = None,
    old_model: str | None = None,
    version: str | None = None,
    train: TrainConfig,
    tau: float = 0.01,
    k: int = 10,
    compat_weight: float = 1.0,
    backbone_kwargs: dict | None = None,
    augment: bool = True,
    image_size: int | None = None,
) -> ModelSpec:
    """Train a new (or the old) backbone with the method's loss: independent, bct or ract.

    The loss is classification + ``compat_weight`` x the method's compatibility term (lambda = 1 in both
    papers). ``backbone_kwargs`` go to the architecture's builder (e.g. ``{"width": 16}`` for small_cnn).
    ``augment``: mild crops and colour jitter on each batch. Turn it off to let a new model fit its training
    set. That this helps is this project's hypothesis, not the papers' (their reference code trains with
    augmentation and label smoothing): FastFill's head learns its per-item loss on that set, and the loss
    measures where the transformation fails only where the new model is right.

    Args:
        images_uri: the labelled training image table (``id``, ``image``, ``label``), local or s3://.
        out_uri: the artefact directory to write (``model.json`` + weights).
        method: :attr:`Method.INDEPENDENT` (also the old model), :attr:`Method.BCT` or :attr:`Method.RACT`.
        architecture: a name from :mod:`raybackfill.models.registry` (``small_cnn``, ``resnet18``, ...).
        embedding_dim: the embedding size.
        num_classes: classifier width (default: the largest label + 1).
        old_model: the old backbone artefact, required by bct and ract.
        version: recorded in ``model.json`` (default: the output directory's name).
        train: epochs, batch size, learning rate, workers and GPUs for Ray Train.
        tau: RACT's temperature. k: RACT's number of old-gallery negatives.
        compat_weight: weight of the compatibility term.
        backbone_kwargs: extra builder arguments.
        augment: mild augmentation of each batch.
        image_size: the square the images are prepared to (default: the first image's shorter side).

    Returns:
        The written artefact's :class:`~raybackfill.models.artifacts.ModelSpec`, with the training summary.

    Example:
        >>> spec = train_backbone("data/splits/train", "models/new", method=Method.BCT,
        ...                       old_model="models/old", train=TrainConfig(epochs=10))  # doctest: +SKIP
    """
    method = parse(Method, method)
    loss = get_recipe(method).backbone_loss
    if loss is not BackboneLoss.CLASSIFICATION and old_model is None:
        raise ValueError(f"method {method.value!r} trains against the old model: pass old_model")
    num_classes = num_classes or _num_classes(images_uri)
    kwargs = {**(backbone_kwargs or {}), "embedding_dim": embedding_dim, "num_classes": num_classes}
    config: dict = {
        "architecture": architecture,
        "kwargs": kwargs,
        "backbone_loss": loss,
        "tau": tau,
        "k": k,
        "compat_weight": compat_weight,
        "augment": augment,
    }
    if loss is BackboneLoss.BCT:
        assert old_model is not None  # refused above for every loss but classification
        weight, bias = _bct_old_classifier(images_uri, old_model, num_classes)
        config.update(old_classifier_weight=weight, old_classifier_bias=bias)
    elif loss is BackboneLoss.RACT:
        config["old_model"] = old_model
    preprocessing = training_preprocessing(images_uri, image_size)
    datasets, validation_labels = image_datasets(images_uri, train, preprocessing)
    state = fit(loops.backbone_loop, train, config | {"name": f"{method} backbone"}, datasets)
    return _save(
        state,
        architecture,
        kwargs,
        out_uri,
        version=version or _version_of(out_uri),
        method=method,
        training_data=images_uri,
        preprocessing=preprocessing,
        parent=old_model,
        training=training_summary(state, validation_labels),
    )


def _bct_old_classifier(images_uri: str, old_model: str, num_classes: int) -> tuple[np.ndarray, ...]:
    """BCT's frozen old classifier, with rows synthesized (class-mean old features) for new classes."""
    old = load_model(old_model).classifier
    with tempfile.TemporaryDirectory() as scratch:
        embed_gallery(images_uri, {EMBEDDING: old_model}, scratch, progress=False)
        features, labels = old_features_by_id(storage.read_table(scratch, columns=[ID, EMBEDDING, LABEL]))
    weight, bias = synthesize_old_classifier(old.weight, old.bias, features, labels, num_classes)
    return weight.numpy(), bias.numpy()


def old_features_by_id(table: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of an embedded table in id order. The embed job writes rows in the order its
    batches finish, and float32 class means depend on the order they are summed in: unsorted, two runs
    with one seed trained different BCT models (full demo: BCT query / old gallery 0.494 vs 0.496)."""
    table = table.sort_by(ID)
    return (
        torch.from_numpy(vectors_of(table)),
        torch.from_numpy(table.column(LABEL).to_numpy().astype(np.int64)),
    )


def train_side_info(
    images_uri: str,
    out_uri: str,
    *,
    embedding_dim: int = 32,
    version: str | None = None,
    train: TrainConfig,
    image_size: int | None = None,
) -> ModelSpec:
    """Self-supervised (SimCLR) side-information model, trained on the old model's training images.

    Args:
        images_uri: the old model's training image table (labels are not used).
        out_uri: the artefact directory to write.
        embedding_dim: the side-information size (small next to the embedding: it is stored per item).
        version: recorded in ``model.json`` (default: the output directory's name).
        train: Ray Train settings.
        image_size: the square the images are prepared to (default: the first image's shorter side).

    Returns:
        The written artefact's spec.

    Example:
        >>> train_side_info("data/splits/train_old", "models/side", train=TrainConfig())  # doctest: +SKIP
    """
    kwargs = {"embedding_dim": embedding_dim}
    config = {"architecture": "side_info_cnn", "kwargs": kwargs}
    preprocessing = training_preprocessing(images_uri, image_size)
    datasets = image_datasets(images_uri, train, preprocessing)[0]
    state = fit(loops.side_info_loop, train, config | {"name": "side-info"}, datasets)
    return _save(
        state,
        "side_info_cnn",
        kwargs,
        out_uri,
        version=version or _version_of(out_uri),
        training_data=images_uri,
        preprocessing=preprocessing,
        training=training_summary(state),
    )


def joined_embeddings(old_uri: str, new_uri: str, *, side_info: bool) -> pa.Table:
    """Rows present in both tables, keyed by id: ``old``, ``new``, ``label`` and optionally ``side``."""
    required = (LABEL, SIDE_INFO) if side_info else (LABEL,)
    old = validate_embedding_table(storage.read_table(old_uri), old_uri, require=required)
    new = validate_embedding_table(storage.read_table(new_uri), new_uri)
    # Arrow's hash join cannot carry fixed-size-list columns; ids are unique, so intersect positions.
    ids, in_old, in_new = np.intersect1d(old.column(ID).to_numpy(), new.column(ID).to_numpy(), return_indices=True)
    if len(ids) == 0:
        raise ValueError(f"{old_uri} and {new_uri} share no ids")
    old, new = old.take(in_old), new.take(in_new)
    columns = {"old": old.column(EMBEDDING), "new": new.column(EMBEDDING), LABEL: old.column(LABEL)}
    if side_info:
        columns["side"] = old.column(SIDE_INFO)
    return pa.table({ID: pa.array(ids), **columns}).combine_chunks()


def train_transformation(
    old_uri: str,
    new_uri: str,
    out_uri: str,
    *,
    new_model: str,
    side_info: bool = False,
    uncertainty: bool = False,
    hidden_dim: int = 128,
    mixer_dim: int = 512,
    version: str | None = None,
    train: TrainConfig,
) -> ModelSpec:
    """FCT (``uncertainty=False``) or FastFill forward transformation h(old, side) -> new space.

    Args:
        old_uri: old embeddings of the training images (with ``label``; and ``side_info`` when used).
        new_uri: the new model's embeddings of the same images.
        out_uri: the artefact directory to write.
        new_model: the new backbone artefact (FastFill reads its classifier for the per-item loss).
        side_info: h also reads the stored side-information embedding.
        uncertainty: FastFill: h also predicts each item's uncertainty, which orders the backfill.
        hidden_dim: width of h's hidden layers. mixer_dim: width of the side-information mixer.
        version: recorded in ``model.json`` (default: the output directory's name).
        train: Ray Train settings.

    Returns:
        The written artefact's spec; its ``method`` is the matching :class:`Method`.

    Example:
        >>> train_transformation("emb/train_old", "emb/train_new", "models/fastfill", new_model="models/new",
        ...                      uncertainty=True, train=TrainConfig())  # doctest: +SKIP
    """
    table = joined_embeddings(old_uri, new_uri, side_info=side_info)
    dims = {
        name: table.schema.field(name).type.list_size for name in table.schema.names if name in ("old", "side", "new")
    }
    kwargs = {
        "old_dim": dims["old"],
        "new_dim": dims["new"],
        "side_dim": dims.get("side"),
        "hidden_dim": hidden_dim,
        "mixer_dim": mixer_dim,
    }
    architecture = "fastfill_transformation" if uncertainty else "forward_transformation"
    config: dict = {"architecture": architecture, "kwargs": kwargs}
    if uncertainty:
        classifier = load_model(new_model).classifier
        config.update(
            new_classifier_weight=classifier.weight.detach().numpy(),
            new_classifier_bias=classifier.bias.detach().numpy(),
        )
    method = next(
        m
        for m, r in RECIPES.items()
        if r.forward_transformation and (r.uncertainty, r.side_info) == (uncertainty, side_info)
    )
    state = fit(loops.transformation_loop, train, config | {"name": method}, table_datasets(table, train))
    return _save(
        state,
        architecture,
        kwargs,
        out_uri,
        version=version or _version_of(out_uri),
        method=method,
        training_data=f"{old_uri} -> {new_uri}",
        parent=new_model,
        training=training_summary(state),
    )


def train_reverse(
    old_uri: str,
    new_uri: str,
    out_uri: str,
    *,
    hidden_dim: int = 256,
    tau: float = 0.05,
    version: str | None = None,
    train: TrainConfig,
) -> ModelSpec:
    """psi: new -> old space with metric-compatible contrastive training (for rank merge with one query pass).

    Args:
        old_uri: old embeddings of the training images (with ``label``).
        new_uri: the new model's embeddings of the same images.
        out_uri: the artefact directory to write.
        hidden_dim: width of psi's hidden layer.
        tau: the contrastive temperature.
        version: recorded in ``model.json`` (default: the output directory's name).
        train: Ray Train settings.

    Returns:
        The written artefact's spec (method ``rank_merge_psi``).

    Example:
        >>> train_reverse("emb/train_old", "emb/train_new", "models/psi", train=TrainConfig())  # doctest: +SKIP
    """
    table = joined_embeddings(old_uri, new_uri, side_info=False)
    kwargs = {
        "new_dim": table.schema.field("new").type.list_size,
        "old_dim": table.schema.field("old").type.list_size,
        "hidden_dim": hidden_dim,
    }
    config = {"architecture": "reverse_transformation", "kwargs": kwargs, "tau": tau, "name": "psi"}
    state = fit(loops.reverse_loop, train, config, table_datasets(table, train))
    return _save(
        state,
        "reverse_transformation",
        kwargs,
        out_uri,
        version=version or _version_of(out_uri),
        method=Method.RANK_MERGE_PSI,
        training_data=f"{new_uri} -> {old_uri}",
        training=training_summary(state),
    )


def _version_of(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]
