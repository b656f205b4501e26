"""The offline half of `raybackfill demo`: data -> every compatible-upgrade method -> report.json + plot.

One run makes (or reads) a labelled image table, splits it (old classes = the old model's world), trains
the old model, the new one and every compatibility artefact with the train API (Ray Train), embeds all
images once per backbone with the embed jobs (Ray Data), transforms the stored old gallery embeddings
(FCT / FastFill, no images read), and evaluates every method x backfill policy offline with
raybackfill.eval. The online phase (live index, backfill while a client queries) plugs in through
``run_offline(..., online=...)``; without it the report has no ``online`` section rather than a made-up one.

Everything lands under ``config.out``: data/, models/, embeddings/, runs/ (Ray Train), report.json,
backfill_curves.png and demo.json (the resolved config). An out directory holding a finished or partial
demo is refused: artefacts are never overwritten, so a second run needs a new directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from raybackfill.backfill.policies import priority_scores
from raybackfill.compat.losses import fastfill_item_loss
from raybackfill.compat.recipes import get_recipe
from raybackfill.data import storage as io
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
from raybackfill.data.splits import OLD_TRAIN, split_table, write_splits
from raybackfill.data.synth import write_synthetic
from raybackfill.embed.pipeline import embed_gallery
from raybackfill.eval.metrics import EvalConfig, RetrievalResult, evaluate, prepare
from raybackfill.eval.offline import (
    COLUMN_ORDER,
    Embeddings,
    LoadedTables,
    OfflineConfig,
    method_spaces,
    order_run,
    write_outputs,
)
from raybackfill.eval.report import build_report
from raybackfill.models.artifacts import ModelSpec, load_model, read_spec, save_model
from raybackfill.models.transformations import apply_transformation
from raybackfill.train.api import train_backbone, train_reverse, train_side_info, train_transformation
from raybackfill.train.quality import require_learned
from raybackfill.train.trainer import TrainConfig

BACKBONES = ("old", "new", "bct", "ract")
TRANSFORMATIONS = ("fct", "fct_side_info", "fastfill", "fastfill_side_info")
# The order a perfect FastFill head would give: by each gallery item's true L_i, computed here from the new
# embeddings the backfill has not made yet. Not a policy (production has no new embeddings to rank by); it
# shows how much any uncertainty head could gain on this data.
ORACLE_LOSS = "oracle_loss"
ORACLE_ORDER = COLUMN_ORDER + ORACLE_LOSS
# Backfill orders evaluated per method (first listed = the one the method is usually quoted with).
METHOD_POLICIES: dict[str, tuple[str, ...]] = {
    "bct": ("entropy", "random"),
    "ract": ("entropy", "random"),
    "fct": ("random",),
    "fct_side_info": ("random",),
    "fastfill": ("uncertainty", "random", "entropy", ORACLE_ORDER),
    "fastfill_side_info": ("uncertainty", "random", "entropy", ORACLE_ORDER),
    "rank_merge": ("random", "entropy"),
    "rank_merge_psi": ("random", "entropy"),
}


@dataclass(frozen=True)
class Fit:
    """How one kind of model trains: epochs, global batch size, peak learning rate (cosine schedule) and,
    for the supervised backbones, whether batches are augmented (see ``train_backbone``)."""

    epochs: int
    batch_size: int
    lr: float
    augment: bool = True


@dataclass(frozen=True)
class DemoScale:
    """How big the demo is: built-in data size, model sizes and how each kind of model trains.

    Epoch counts are budgets, not choices: every run holds out a validation share of its own training rows
    and keeps the epoch that split chooses (see :class:`raybackfill.train.trainer.Monitor`); the backbones'
    learning rate is chosen among ``backbone_lrs`` on the old model's validation split. What stays fixed is
    the shape of the search: small batches for the backbones (more optimizer steps per epoch at the same
    cost on a CPU), no augmentation (so the new models fit their training set, which this project supposes
    FastFill's head relies on; the papers' reference code trains with augmentation and label smoothing), and
    for the built-in data 50 classes x 140 images so that the query split (1400 queries) makes one query
    0.07 points of top-1.
    """

    classes: int = 50  # built-in data only (ignored with --data)
    per_class: int = 140
    image_size: int = 32
    width: int = 16  # small_cnn trunk width of the backbones
    embedding_dim: int = 64
    # As wide as the old embedding, as in FCT's reference architecture (128-d old and side-information).
    side_info_dim: int = 64
    # Learning rates the old model is trained at; its validation split picks the one every backbone uses (the
    # ``lr`` of ``old`` and ``new`` is then replaced). A single rate skips the search.
    backbone_lrs: tuple[float, ...] = (3e-3, 1e-3, 1e-2)
    old: Fit = Fit(epochs=8, batch_size=32, lr=3e-3, augment=False)
    new: Fit = Fit(epochs=40, batch_size=32, lr=3e-3, augment=False)  # the new (independent), BCT, RACT backbones
    side_info: Fit = Fit(epochs=10, batch_size=128, lr=3e-3)  # SimCLR wants many in-batch negatives
    transformation: Fit = Fit(epochs=20, batch_size=64, lr=1e-3)  # FCT / FastFill
    reverse: Fit = Fit(epochs=15, batch_size=128, lr=1e-3)  # psi
    ract_tau: float = 0.01  # RACT's temperature, the paper's value (not tuned here)
    hidden_dim: int = 128  # transformation branches
    mixer_dim: int = 512
    beta_points: int = 21
    random_seeds: int = 8  # random orders the other orders are compared with (report: seed_aucs)


FULL = DemoScale()
QUICK = DemoScale(
    classes=20,
    per_class=100,
    old=Fit(epochs=6, batch_size=32, lr=3e-3, augment=False),
    new=Fit(epochs=30, batch_size=32, lr=3e-3, augment=False),
    side_info=Fit(epochs=12, batch_size=128, lr=3e-3),
    transformation=Fit(epochs=15, batch_size=64, lr=1e-3),
    reverse=Fit(epochs=10, batch_size=128, lr=1e-3),
    beta_points=11,
    random_seeds=4,
)


@dataclass(frozen=True)
class DemoConfig:
    """One demo run. ``data=None`` uses the built-in synthetic dataset at ``scale``."""

    out: str = "raybackfill-demo"
    quick: bool = False
    data: str | None = None  # any labelled image table (id, image, label), local or s3://
    old_classes: str = "half"  # classes the old model is trained on: "half", "0-49", "0,1,5-9"
    seed: int = 0  # data, splits, training and the random policy
    scale: DemoScale | None = None  # None: QUICK or FULL by ``quick``
    fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.5, "gallery": 0.3, "query": 0.2})
    num_workers: int = 0  # Ray Train workers per model; 0 = local mode in the driver (fastest on 2 cores)
    cpus_per_worker: float = 1.0
    # torch intra-op threads of the driver, which trains in local mode. One thread measured 3-5x faster per
    # epoch than two on a 2-core box: a second thread fights Ray Data's batch iteration threads.
    torch_threads: int = 1
    metric: str = "cosine"
    # Stop with ModelDidNotLearnError when a backbone ends near chance on its validation split. Off only for
    # structural tests on data too small to tell (a few images per class).
    require_learning: bool = True

    def resolved_scale(self) -> DemoScale:
        if self.scale is not None:
            return self.scale
        return QUICK if self.quick else FULL


@dataclass(frozen=True)
class DemoLayout:
    """Where each artefact of a demo lives under its out directory."""

    out: str

    def path(self, *parts: str) -> str:
        return io.join(self.out, *parts)

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
    """What the offline phase produced: everything the online phase needs to serve and backfill.

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


# The online phase: gets the artefacts, runs the live index + backfill + query client, and returns
# the report's ``online`` section: {items, seconds, items_per_s, queries, query_errors}.
OnlinePhase = Callable[[DemoArtifacts], Mapping[str, float]]


def run_offline(config: DemoConfig, *, online: OnlinePhase | None = None, log: Callable[[str], None] = print) -> dict:
    """Run the demo (Ray must be initialised) and return the report dict it also saved to report.json."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.torch_threads)
    try:
        return _run(config, online, log)
    finally:
        torch.set_num_threads(threads)


def _run(config: DemoConfig, online: OnlinePhase | None, log: Callable[[str], None]) -> dict:
    scale = config.resolved_scale()
    layout = DemoLayout(config.out)
    if io.exists(layout.config):
        raise FileExistsError(f"{layout.config}: a demo already ran in {config.out}; choose a new --out")
    io.write_bytes(
        layout.config, json.dumps(dataclasses.asdict(config) | {"scale": dataclasses.asdict(scale)}, indent=2).encode()
    )
    timings: dict[str, float] = {}
    load_start, started = os.getloadavg()[0], time.perf_counter()

    def stage(name: str) -> contextlib.AbstractContextManager[None]:
        return _stage(name, timings, log)

    with stage("data"):
        images = config.data or _make_builtin_data(layout, scale, config.seed)
        splits = _split(images, layout, config)
    with stage("train backbones"):
        models, training = _train_backbones(layout, splits, scale, config, log)
    with stage("embed"):
        embeddings = _embed_all(images, layout, models)
        table = io.read_table(embeddings)
        labels = {name: io.read_table(uri, columns=[ID, LABEL]) for name, uri in splits.items()}
        gallery_old = _write_split(table, labels["gallery"], EMBEDDING, layout.embeddings("old", "gallery"))
        old_train = _write_split(table, labels["train"], EMBEDDING, layout.embeddings("old", "train"))
        new_train = _write_split(table, labels["train"], "new", layout.embeddings("new", "train"))
    with stage("train transformations"):
        models |= _train_transformations(layout, old_train, new_train, models["new"], scale, config)
    artifacts = DemoArtifacts(layout, images, splits, models, embeddings, gallery_old)
    online_section = None
    if online is not None:
        with stage("online"):
            online_section = dict(online(artifacts))
    with stage("evaluate"):
        report = evaluate_demo(artifacts, table, labels, scale, config)
    report["training"] = training
    if online_section is not None:
        report["online"] = online_section
    timings["total"] = round(time.perf_counter() - started, 2)
    # Wall times on a shared machine mean little without its load: the 1-minute load average at both ends.
    report["timings"] = timings | {"cpus": os.cpu_count(), "load_average": [load_start, os.getloadavg()[0]]}
    write_outputs(report, config.out)
    return report


@contextlib.contextmanager
def _stage(name: str, timings: dict[str, float], log: Callable[[str], None]) -> Iterator[None]:
    """Time one stage of the demo into ``timings`` and log when it starts and ends."""
    log(f"[demo] {name} ...")
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 2)
    log(f"[demo] {name}: {timings[name]:.1f}s")


# ---- data ------------------------------------------------------------------------------------------------


def _make_builtin_data(layout: DemoLayout, scale: DemoScale, seed: int) -> str:
    write_synthetic(layout.images, classes=scale.classes, per_class=scale.per_class, size=scale.image_size, seed=seed)
    return layout.images


def _split(images: str, layout: DemoLayout, config: DemoConfig) -> dict[str, str]:
    table = validate_image_table(io.read_table(images, columns=[ID, IMAGE, LABEL]), images, require_label=True)
    parts = split_table(table, config.fractions, old_classes=config.old_classes, seed=config.seed, source=images)
    for name in ("train", "gallery", "query"):
        if name not in parts:
            raise ValueError(f"the demo needs a '{name}' split; fractions give {sorted(parts)}")
    write_splits(parts, layout.path("data", "splits"))
    return {name: layout.split(name) for name in parts}


def _write_split(table: pa.Table, rows: pa.Table, column: str, uri: str) -> str:
    """One backbone's vectors (``column`` of the all-images table) for the ids of a split, as an embedding
    table with the split's labels (and the side-information next to the old vectors)."""
    positions = _positions(table.column(ID).to_numpy(), rows.column(ID).to_numpy())
    part = table.take(pa.array(positions))
    side = vectors_of(part, SIDE_INFO) if column == EMBEDDING else None
    out = embedding_table(
        part.column(ID).to_numpy(),
        vectors_of(part, column),
        side_info=side,
        model=column if column != EMBEDDING else "old",
        extra={LABEL: part.column(LABEL)},
    )
    io.write_table(out, uri)
    return uri


def _positions(all_ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row positions of ``wanted`` ids in ``all_ids`` (every wanted id must be present)."""
    order = np.argsort(all_ids, kind="stable")
    where = np.searchsorted(all_ids[order], wanted)
    where = np.minimum(where, len(order) - 1)
    found = all_ids[order][where] == wanted
    if not found.all():
        raise ValueError(f"{int((~found).sum())} ids have no embedding (quarantined while embedding?)")
    return order[where]


# ---- training --------------------------------------------------------------------------------------------


def _train_config(name: str, layout: DemoLayout, config: DemoConfig, fit: Fit) -> TrainConfig:
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


def _train_backbones(
    layout: DemoLayout, splits: dict[str, str], scale: DemoScale, config: DemoConfig, log: Callable[[str], None]
) -> tuple[dict[str, str], dict]:
    """Train the old, new, BCT and RACT backbones and the side-information model. Returns their artefacts and
    the report's ``training`` section (the learning rate chosen, each backbone's kept epoch and figures)."""
    models = {name: layout.model(name) for name in (*BACKBONES, "side_info")}
    common = {"embedding_dim": scale.embedding_dim, "backbone_kwargs": {"width": scale.width}}
    train_all, train_old = splits["train"], splits[OLD_TRAIN]

    def cfg(name: str, fit: Fit) -> TrainConfig:
        return _train_config(name, layout, config, fit)

    def report(name: str, spec: ModelSpec, seconds: float) -> None:
        """Log how the backbone trained and stop the demo if it did not learn (see raybackfill.train.quality)."""
        t = spec.training
        figures = f"train accuracy {t['train_accuracy']:.3f}"
        if "val_accuracy" in t:
            figures += f", validation {t['val_accuracy']:.3f} (largest class {t['chance_accuracy']:.3f})"
        log(f"[demo]   {name} model: {seconds:.1f}s, epoch {t['best_epoch'] + 1}/{t['epochs']}: {figures}")
        if config.require_learning:
            require_learned(t, name)

    start = time.perf_counter()
    lr, searched = _choose_backbone_lr(layout, train_old, models["old"], scale, config, common, log)
    report("old", read_spec(models["old"]), time.perf_counter() - start)
    training: dict = {"backbone_lr": lr, "lr_search": searched, "backbones": {"old": _summary(models["old"])}}
    new_fit = dataclasses.replace(scale.new, lr=lr)
    for name in ("new", "bct", "ract"):
        start = time.perf_counter()
        method = "independent" if name == "new" else name
        spec = train_backbone(
            train_all,
            models[name],
            method=method,
            old_model=None if name == "new" else models["old"],
            train=cfg(name, new_fit),
            augment=scale.new.augment,
            version=name,
            tau=scale.ract_tau,
            **common,
        )
        report(name, spec, time.perf_counter() - start)
        training["backbones"][name] = _summary(models[name])
    start = time.perf_counter()
    train_side_info(
        train_old,
        models["side_info"],
        embedding_dim=scale.side_info_dim,
        train=cfg("side_info", scale.side_info),
    )
    log(f"[demo]   side-info model: {time.perf_counter() - start:.1f}s")
    return models, training


def _summary(model: str) -> dict:
    """A backbone's run as the report keeps it: the epoch kept and its figures (model.json has every epoch)."""
    t = read_spec(model).training
    keys = ("best_epoch", "epochs", "train_accuracy", "val_accuracy", "chance_accuracy", "validation_rows")
    return {k: t[k] for k in keys if k in t}


def _choose_backbone_lr(
    layout: DemoLayout,
    images: str,
    out: str,
    scale: DemoScale,
    config: DemoConfig,
    common: dict,
    log: Callable[[str], None],
) -> tuple[float, dict[str, float]]:
    """Train the old model at each of ``scale.backbone_lrs`` and keep the one with the best validation accuracy
    (the first listed on a tie) as ``out``; the new, BCT and RACT backbones then train at its learning rate.

    The old model is the cheapest backbone (half the classes, fewest epochs) and shares the new ones'
    architecture and images, so its validation split picks the rate for all of them: no rate is tuned on the
    query or gallery split. Returns the rate and every candidate's validation accuracy.
    """
    candidates = {}
    for lr in scale.backbone_lrs:
        uri = layout.path("models", "lr-search", f"old-lr{lr:g}")
        spec = train_backbone(
            images,
            uri,
            train=_train_config(f"old-lr{lr:g}", layout, config, dataclasses.replace(scale.old, lr=lr)),
            version="old",
            augment=scale.old.augment,
            **common,
        )
        candidates[lr] = (spec.training.get("val_accuracy", spec.training["train_accuracy"]), uri)
    best = max(candidates, key=lambda lr: (candidates[lr][0], -scale.backbone_lrs.index(lr)))
    chosen = load_model(candidates[best][1])
    save_model(chosen.module, out, chosen.spec)
    shown = ", ".join(f"{lr:g} -> {acc:.3f}" for lr, (acc, _) in candidates.items())
    log(f"[demo]   learning rate {best:g} (old model's validation accuracy by rate: {shown})")
    return best, {f"{lr:g}": acc for lr, (acc, _) in candidates.items()}


def _train_transformations(
    layout: DemoLayout, old_train: str, new_train: str, new_model: str, scale: DemoScale, config: DemoConfig
) -> dict[str, str]:
    models = {}
    for method in TRANSFORMATIONS:
        recipe = get_recipe(method)
        models[method] = layout.model(method)
        train_transformation(
            old_train,
            new_train,
            models[method],
            new_model=new_model,
            side_info=recipe.side_info,
            uncertainty=recipe.uncertainty,
            hidden_dim=scale.hidden_dim,
            mixer_dim=scale.mixer_dim,
            version=method,
            train=_train_config(method, layout, config, scale.transformation),
        )
    models["psi"] = layout.model("psi")
    train_reverse(
        old_train,
        new_train,
        models["psi"],
        version="psi",
        train=_train_config("psi", layout, config, scale.reverse),
    )
    return models


# ---- embedding -------------------------------------------------------------------------------------------


def _embed_all(images: str, layout: DemoLayout, models: dict[str, str]) -> str:
    """Every image under every backbone in one pass (one decode, one actor holding all the models): the old
    vectors as ``embedding`` with their ``side_info``, the others under their own names."""
    columns = {EMBEDDING: models["old"], SIDE_INFO: models["side_info"]}
    columns |= {name: models[name] for name in BACKBONES if name != "old"}
    return embed_gallery(images, columns, layout.path("embeddings", "all"), progress=False).uri


# ---- evaluation ------------------------------------------------------------------------------------------


def _matrix(table: pa.Table, ids: np.ndarray, column: str) -> np.ndarray:
    return vectors_of(table, column)[_positions(table.column(ID).to_numpy(), ids)]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties broken by position: fine for continuous scores)."""
    ranks = []
    for x in (a, b):
        r = np.empty(len(x))
        r[np.argsort(x, kind="stable")] = np.arange(len(x))
        ranks.append(r)
    return float(np.corrcoef(*ranks)[0, 1])


def uncertainty_agreement(scores: np.ndarray, transformed: np.ndarray, new: np.ndarray) -> dict[str, float]:
    """Does FastFill's predicted uncertainty rank items by their true transformation error? Spearman of the
    scores against the per-item MSE the head is trained on (key ``""``) and against the angular error
    1 - cos(h, new) (key ``"_angular"``), the only part of the error a cosine index ranks by: the two disagree
    where the new embeddings' norms vary from item to item. Key ``"_norm"``: against |h| itself, which a
    cosine index ignores; near 1 means the head mostly ranks by how long the vectors it emits are."""
    mse = ((transformed - new) ** 2).mean(axis=1)
    cosines = (prepare(transformed, "cosine") * prepare(new, "cosine")).sum(axis=1)
    return {
        "": spearman(scores, mse),
        "_angular": spearman(scores, 1.0 - cosines),
        "_norm": spearman(scores, np.linalg.norm(transformed, axis=1)),
    }


def _with_oracle_loss(
    gallery: Embeddings, transformed: np.ndarray, new: np.ndarray, labels: np.ndarray, new_classifier: torch.nn.Linear
) -> Embeddings:
    """The old gallery with an ``oracle_loss`` column: each item's true FastFill L_i (see ORACLE_ORDER)."""
    with torch.inference_mode():
        loss = fastfill_item_loss(
            torch.from_numpy(transformed),
            torch.from_numpy(new),
            torch.from_numpy(labels).long(),
            new_classifier.weight,
            new_classifier.bias,
        ).numpy()
    column = pa.array(loss.astype(np.float64))
    return dataclasses.replace(gallery, table=gallery.table.append_column(ORACLE_LOSS, column))


def evaluate_demo(
    artifacts: DemoArtifacts, table: pa.Table, labels: dict[str, pa.Table], scale: DemoScale, config: DemoConfig
) -> dict:
    """Anchors (old/old, new/new and every cross test) and one backfill curve per method x policy.

    ``table`` holds every image under every backbone (see :func:`_embed_all`). The FCT/FastFill gallery
    and psi(new query) are computed here from the stored vectors with the trained transformations; which
    vectors each method scores with, and each policy's order, come from raybackfill.eval.offline.
    """
    eval_config = EvalConfig(metric=config.metric, protocol="disjoint")
    q_ids, q_labels = (labels["query"].column(c).to_numpy() for c in (ID, LABEL))
    g_ids, g_labels = (labels["gallery"].column(c).to_numpy() for c in (ID, LABEL))
    columns = {"old": EMBEDDING, "new": "new", "bct": "bct", "ract": "ract"}
    query = {name: _matrix(table, q_ids, column) for name, column in columns.items()}
    gallery = {name: _matrix(table, g_ids, column) for name, column in columns.items()}
    side = _matrix(table, g_ids, SIDE_INFO)
    heads = {m: load_model(artifacts.models[m]).module for m in TRANSFORMATIONS}
    # FastFill's s is not kept here: the uncertainty order scores the gallery itself (priority_scores below).
    transformed = {
        m: apply_transformation(h, gallery["old"], side if h.uses_side_info else None)[0] for m, h in heads.items()
    }
    query["psi"] = apply_transformation(load_model(artifacts.models["psi"]).module, query["new"])[0]

    def measure(q: np.ndarray, g: np.ndarray) -> RetrievalResult:
        return evaluate(q, g, q_labels, g_labels, eval_config)

    anchors = {
        "old_old": measure(query["old"], gallery["old"]),
        "new_new": measure(query["new"], gallery["new"]),
        "bct_old": measure(query["bct"], gallery["old"]),
        "bct_bct": measure(query["bct"], gallery["bct"]),
        "ract_old": measure(query["ract"], gallery["old"]),
        "ract_ract": measure(query["ract"], gallery["ract"]),
        "psi_old": measure(query["psi"], gallery["old"]),
        **{f"new_{m}": measure(query["new"], transformed[m]) for m in TRANSFORMATIONS},
    }

    def embeddings(ids: np.ndarray, vectors: np.ndarray, side_info: np.ndarray | None = None) -> Embeddings:
        return Embeddings(ids, vectors, embedding_table(ids, vectors, side_info=side_info))

    old_gallery = embeddings(g_ids, gallery["old"], side)
    new_classifier = load_model(artifacts.models["new"]).module.classifier
    runs, diagnostics = [], {}
    for method, policies in METHOD_POLICIES.items():
        recipe = get_recipe(method)
        backbone = recipe.backbone_loss if recipe.backbone_loss in ("bct", "ract") else "new"
        old_of_method = old_gallery
        if recipe.uncertainty:
            old_of_method = _with_oracle_loss(
                old_gallery, transformed[method], gallery["new"], g_labels, new_classifier
            )
        tables = LoadedTables(
            q_labels,
            g_labels,
            queries={name: embeddings(q_ids, query[name]) for name in ("old", "psi")}
            | {"new": embeddings(q_ids, query[backbone])},
            gallery={"old": old_of_method, "new": embeddings(g_ids, gallery[backbone])}
            | ({"transformed": embeddings(g_ids, transformed[method])} if recipe.forward_transformation else {}),
        )
        spaces = method_spaces(method, tables)
        offline = OfflineConfig(
            method,
            orders=policies,
            beta_points=scale.beta_points,
            metric=config.metric,
            seed=config.seed,
            transformation=artifacts.models[method] if recipe.uncertainty else None,
            old_model=artifacts.models["old"],
            # Priority orders are judged against a band of random orders, not one draw (fct alone has none).
            random_seeds=scale.random_seeds if len(policies) > 1 else 1,
        )
        runs += [order_run(policy, spaces, tables, offline, anchors["old_old"], eval_config) for policy in policies]
        if recipe.uncertainty:
            scores = priority_scores(
                "uncertainty",
                g_ids,
                old=gallery["old"],
                side=side if heads[method].uses_side_info else None,
                transformation=heads[method],
            )
            agreement = uncertainty_agreement(scores, transformed[method], gallery["new"])
            diagnostics |= {f"{method}_uncertainty_spearman{suffix}": value for suffix, value in agreement.items()}
    report = build_report(anchors, runs)
    report["diagnostics"] = diagnostics
    return report
