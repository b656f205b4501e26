"""`raybackfill demo`, stage by stage: data -> every compatible-upgrade method -> report.json, report.md, plots.

One run makes (or reads) a labelled image table, splits it (old classes = the old model's world), trains
the old model, the new one and every compatibility artefact with the train API (Ray Train), embeds all
images once per backbone with the embed jobs (Ray Data), transforms the stored old gallery embeddings
(FCT / FastFill, no images read), fits every label-free adapter on the train split's stored embeddings
(raybackfill.adapters: no labels, no classifier), and evaluates every method x backfill order offline with
raybackfill.eval. The online phase (live index, backfill while a client queries) plugs in through
``run_demo(..., online=...)``; without it the report has no ``online`` section rather than a made-up one.
With ``DemoConfig.chain`` a third backbone v3 and h23 (v2 -> v3) train after the adapters, and the report gets
a ``chain`` section (raybackfill.demo.chain) and chain_curves.png.

Everything lands under ``config.out``: data/, models/, embeddings/, runs/ (Ray Train), report.json,
report.md, backfill_curves.png and demo.json (the resolved config). An out directory holding a finished or
partial demo is refused: artefacts are never overwritten, so a second run needs a new directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from raybackfill.data import storage
from raybackfill.data.schema import (
    EMBEDDING,
    ID,
    IMAGE,
    LABEL,
    SIDE_INFO,
    embedding_table,
    validate_image_table,
    vectors_of,
)
from raybackfill.data.splits import OLD_TRAIN, TRAIN, split_table, write_splits
from raybackfill.data.synth import write_synthetic
from raybackfill.demo.configs import DemoConfig, DemoScale, torch_threads
from raybackfill.embed.pipeline import embed_gallery
from raybackfill.eval.offline import write_outputs
from raybackfill.types import locate_ids

logger = logging.getLogger(__name__)

BACKBONES = ("old", "new", "bct", "ract")
EVALUATION_SPLITS = ("gallery", "query")


@dataclass(frozen=True)
class DemoLayout:
    """Where each artefact of a demo lives under its out directory."""

    out: str

    def path(self, *parts: str) -> str:
        return storage.join(self.out, *parts)

    @property
    def images(self) -> str:
        return self.path("data", "images")

    def split(self, name: str) -> str:
        return self.path("data", "splits", name)

    def model(self, name: str) -> str:
        return self.path("models", name)

    def embeddings(self, model: str, split: str) -> str:
        return self.path("embeddings", model, split)

    @property
    def runs(self) -> str:
        return self.path("runs")

    @property
    def config(self) -> str:
        return self.path("demo.json")


@dataclass(frozen=True)
class DemoArtifacts:
    """What the training stages produced: everything the online phase and the evaluation need.

    ``embeddings``: one table of every image under every backbone (columns ``embedding`` = old,
    ``side_info``, ``new``, ``bct``, ``ract``); ``gallery_old``: the stored old gallery embeddings with
    side-information, which FCT/FastFill transform and the priority policies score.
    """

    layout: DemoLayout
    images: str
    splits: dict[str, str]
    models: dict[str, str]
    embeddings: str
    gallery_old: str


# The online phase: gets the artefacts, runs the live index + backfill + query client, and returns the
# report's ``online`` section: {items, seconds, items_per_s, queries, query_errors, ...}.
OnlinePhase = Callable[[DemoArtifacts], Mapping[str, Any]]


def run_demo(config: DemoConfig, *, online: OnlinePhase | None = None) -> dict:
    """Run the demo (Ray must be initialised) and return the report dict it also saved to report.json."""
    with torch_threads(config.torch_threads):
        return _run(config, online)


def _run(config: DemoConfig, online: OnlinePhase | None) -> dict:
    # Imported here: the training and evaluation stages import torch models and Ray Train.
    from raybackfill.demo.adapters import fit_demo_adapters
    from raybackfill.demo.evaluation import evaluate_demo
    from raybackfill.demo.training import train_backbones, train_transformations

    scale = config.resolved_scale()
    layout = DemoLayout(config.out)
    claim_out_dir(layout, config, scale)
    timer = StageTimer()
    load_start = os.getloadavg()[0]
    with timer("data"):
        images = config.data or make_builtin_data(layout, scale, config.seed)
        splits = split_data(images, layout, config)
    with timer("train backbones"):
        models, training = train_backbones(layout, splits[TRAIN], splits[OLD_TRAIN], scale, config)
    with timer("embed"):
        embeddings = embed_all(images, layout, models)
        table = storage.read_table(embeddings)
        labels = {name: storage.read_table(uri, columns=[ID, LABEL]) for name, uri in splits.items()}
        gallery_old = write_split_embeddings(table, labels["gallery"], EMBEDDING, layout.embeddings("old", "gallery"))
        old_train = write_split_embeddings(table, labels[TRAIN], EMBEDDING, layout.embeddings("old", TRAIN))
        new_train = write_split_embeddings(table, labels[TRAIN], "new", layout.embeddings("new", TRAIN))
    with timer("train transformations"):
        models |= train_transformations(layout, old_train, new_train, models["new"], scale, config)
    with timer("fit adapters"):  # label-free: the same train pairs, no labels, no classifier
        models |= fit_demo_adapters(layout, old_train, new_train, scale, config).models
    chain = None
    if config.chain:
        from raybackfill.demo.chain import evaluate_demo_chain, train_chain

        with timer("chain: train v3 and h23"):
            chain = train_chain(
                layout, images, splits[TRAIN], labels[TRAIN], new_train, models, training["backbone_lr"], scale, config
            )
    artifacts = DemoArtifacts(layout, images, splits, models, embeddings, gallery_old)
    online_section = None
    if online is not None:
        with timer("online"):
            online_section = dict(online(artifacts))
    with timer("evaluate"):
        report = evaluate_demo(artifacts, table, labels, scale, config)
    if chain is not None:
        with timer("evaluate chain"):
            report["chain"] = evaluate_demo_chain(artifacts, chain, table, labels, scale, config)
    report["training"] = training
    if online_section is not None:
        report["online"] = online_section
    # Wall times on a shared machine mean little without its load: the 1-minute load average at both ends.
    report["timings"] = timer.finish() | {"cpus": os.cpu_count(), "load_average": [load_start, os.getloadavg()[0]]}
    write_outputs(report, config.out)
    return report


class StageTimer:
    """Times the demo's stages (``with timer("name"):``) and logs each one's duration when it ends."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        logger.info("%s ...", name)
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 2)
        logger.info("%s: %.1fs", name, self.timings[name])

    def finish(self) -> dict[str, float]:
        """The stages' durations and ``total``, the time since the timer was made."""
        return self.timings | {"total": round(time.perf_counter() - self._start, 2)}


def claim_out_dir(layout: DemoLayout, config: DemoConfig, scale: DemoScale) -> None:
    """Refuse an out directory a demo already ran in; otherwise write the resolved config as demo.json."""
    if storage.exists(layout.config):
        raise FileExistsError(f"{layout.config}: a demo already ran in {config.out}; choose a new --out")
    resolved = dataclasses.asdict(config) | {"scale": dataclasses.asdict(scale)}
    storage.write_bytes(layout.config, json.dumps(resolved, indent=2).encode())


# ---- data ------------------------------------------------------------------------------------------------


def make_builtin_data(layout: DemoLayout, scale: DemoScale, seed: int) -> str:
    write_synthetic(layout.images, classes=scale.classes, per_class=scale.per_class, size=scale.image_size, seed=seed)
    return layout.images


def split_data(images: str, layout: DemoLayout, config: DemoConfig) -> dict[str, str]:
    """Train / gallery / query splits of the image table and the old classes' training rows (``train_old``).

    Every model, and every choice made while training one (learning rate, epoch), sees only the train split:
    gallery and query are the evaluation's."""
    table = validate_image_table(storage.read_table(images, columns=[ID, IMAGE, LABEL]), images, require_label=True)
    parts = split_table(table, config.fractions, old_classes=config.old_classes, seed=config.seed, source=images)
    for name in (TRAIN, *EVALUATION_SPLITS):
        if name not in parts:
            raise ValueError(f"the demo needs a '{name}' split; fractions give {sorted(parts)}")
    write_splits(parts, layout.path("data", "splits"))
    return {name: layout.split(name) for name in parts}


# ---- embedding -------------------------------------------------------------------------------------------


def embed_all(images: str, layout: DemoLayout, models: dict[str, str]) -> str:
    """Every image under every backbone in one pass (one decode, one actor holding all the models): the old
    vectors as ``embedding`` with their ``side_info``, the others under their own names."""
    columns = {EMBEDDING: models["old"], SIDE_INFO: models["side_info"]}
    columns |= {name: models[name] for name in BACKBONES if name != "old"}
    return embed_gallery(images, columns, layout.path("embeddings", "all"), progress=False).uri


def rows_of_ids(table: pa.Table, ids) -> pa.Array:
    """Row positions in ``table`` (the all-images embedding table) of ``ids``, every one of which must be there."""
    try:
        return pa.array(locate_ids(table.column(ID).to_numpy(), ids))
    except KeyError as err:
        raise ValueError(f"{err.args[0]} have no embedding (quarantined while embedding?)") from None


def write_split_embeddings(table: pa.Table, rows: pa.Table, column: str, uri: str, model: str | None = None) -> str:
    """One backbone's vectors (``column`` of the all-images table) for the ids of a split, as an embedding
    table with the split's labels (and the side-information next to the old vectors). ``model``: the table's
    model name (default: ``column``, or ``old`` for the ``embedding`` column)."""
    part = table.take(rows_of_ids(table, rows.column(ID).to_numpy()))
    side = vectors_of(part, SIDE_INFO) if column == EMBEDDING and SIDE_INFO in part.schema.names else None
    out = embedding_table(
        part.column(ID).to_numpy(),
        vectors_of(part, column),
        side_info=side,
        model=model or (column if column != EMBEDDING else "old"),
        extra={LABEL: part.column(LABEL)},
    )
    storage.write_table(out, uri)
    return uri
