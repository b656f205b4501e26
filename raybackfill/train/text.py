"""Train a text encoder (:mod:`raybackfill.models.text`) on a labelled text table with Ray Train.

The texts are prepared once in the driver by the encoder's own preprocessing (the one model.json records, so
what the model trains on is exactly what embed jobs and the backfill later feed it), held as an in-memory table
of token ids and run through :func:`raybackfill.train.trainer.fit`: scaling, per-epoch checkpoints, a stratified
validation share of the rows that picks the epoch. The loss is cross-entropy over the table's classes.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from raybackfill.compat import losses
from raybackfill.data import storage
from raybackfill.data.preprocessing import TextPreprocessing
from raybackfill.data.schema import ID, LABEL, TEXT, SchemaError
from raybackfill.models.artifacts import ModelSpec, save_model
from raybackfill.models.registry import build_model
from raybackfill.train.api import table_datasets, training_summary
from raybackfill.train.loops import Worker, correct
from raybackfill.train.trainer import Goal, Monitor, TrainConfig, fit

logger = logging.getLogger(__name__)

TOKENS = "tokens"


def text_encoder_loop(config: dict) -> None:
    """Cross-entropy on the encoder's logits; the run keeps the epoch with the best validation accuracy."""
    worker = Worker(config, Monitor("val_accuracy", Goal.MAX, rows="val_rows"))
    model = worker.model

    def score(batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor | float, int]]:
        labels = batch[LABEL].long()
        _, logits = model(batch[TOKENS])
        return {
            "accuracy": (correct(logits, labels), len(labels)),
            "ce": (losses.classification_loss(logits, labels), len(labels)),
        }

    for epoch in worker.epochs():
        meters = worker.meters("loss", "train_accuracy")
        for batch in worker.batches(epoch):
            labels = batch[LABEL].long()
            _, logits = model(batch[TOKENS])
            loss = losses.classification_loss(logits, labels)
            worker.step(loss)
            meters["loss"].add(loss, len(labels))
            meters["train_accuracy"].add(correct(logits, labels), len(labels))
        worker.end_epoch(epoch, {k: m.value() for k, m in meters.items()} | worker.validate(score))


def token_table(texts_uri: str, preprocessing: TextPreprocessing) -> pa.Table:
    """The labelled text table as (id, tokens, label) rows, the tokens prepared by ``preprocessing``."""
    table = storage.read_table(texts_uri, columns=[ID, TEXT, LABEL])
    if table.column(LABEL).null_count:
        raise SchemaError(
            f"{texts_uri}: column 'label' has {table.column(LABEL).null_count} nulls; a text encoder "
            "trains on labelled rows"
        )
    prepared = preprocessing.prepare(table.column(TEXT).to_pylist())
    if not prepared.ok.all():
        raise SchemaError(f"{texts_uri}: {int((~prepared.ok).sum())} texts do not prepare ({prepared.reasons[:3]})")
    tokens = np.asarray(prepared.values, dtype=np.int64)
    return pa.table(
        {
            ID: table.column(ID),
            TOKENS: pa.FixedSizeListArray.from_arrays(pa.array(tokens.ravel()), tokens.shape[1]),
            LABEL: table.column(LABEL),
        }
    )


def train_text_encoder(
    texts_uri: str,
    out_uri: str,
    *,
    architecture: str,
    kwargs: dict,
    preprocessing: TextPreprocessing,
    train: TrainConfig,
    version: str | None = None,
) -> ModelSpec:
    """Train a registered text architecture on a labelled text table and save it as an encoder artefact.

    Args:
        texts_uri: the text table (``id``, ``text``, ``label``), local or s3://.
        out_uri: the artefact directory to write.
        architecture: ``text_hashed_words`` or ``text_char_ngrams`` (:mod:`raybackfill.models.registry`).
        kwargs: the builder's arguments; ``num_classes`` defaults to the largest label + 1.
        preprocessing: how texts are prepared (its tokenizer must be the one the architecture reads).
        train: Ray Train settings (epochs, batch size, learning rate, workers, validation share).
        version: recorded in model.json (default: the output directory's name).

    Returns:
        The saved :class:`ModelSpec`; its ``preprocessing`` makes it an encoder the embed jobs and the backfill load.

    Examples:
        >>> train_text_encoder("texts/train", "models/v1", architecture="text_hashed_words",
        ...                    kwargs={"embedding_dim": 48}, preprocessing=TextPreprocessing(tokenizer="hashed_words"),
        ...                    train=TrainConfig(name="v1"))  # doctest: +SKIP
    """
    table = token_table(texts_uri, preprocessing)
    labels = table.column(LABEL)
    kwargs = {"num_classes": int(pc.max(labels).as_py()) + 1, **kwargs}
    if "vocab_size" in kwargs and kwargs["vocab_size"] != preprocessing.vocab_size:
        raise ValueError(
            f"{architecture}: vocab_size {kwargs['vocab_size']} differs from the preprocessing's "
            f"{preprocessing.vocab_size}: word ids would fall outside the table"
        )
    config = {"architecture": architecture, "kwargs": kwargs, "name": f"text encoder {architecture}"}
    state = fit(text_encoder_loop, train, config, table_datasets(table, train))
    module = build_model(architecture, **kwargs)
    module.load_state_dict(state["model"])
    spec = ModelSpec(
        architecture=architecture,
        version=version or out_uri.rstrip("/").rsplit("/", 1)[-1],
        kwargs=kwargs,
        training_data=texts_uri,
        training=training_summary(state),
        preprocessing=preprocessing.to_dict(),
    )
    saved = save_model(module, out_uri, spec)
    t = saved.training
    logger.info(
        "  %s: epoch %d/%d, train accuracy %.3f, validation %.3f",
        saved.version,
        t["best_epoch"] + 1,
        t["epochs"],
        t.get("train_accuracy", float("nan")),
        t.get("val_accuracy", float("nan")),
    )
    return saved
