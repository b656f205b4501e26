"""`raybackfill demo --text`: a text upgrade with no labels on the upgrade path, end to end, offline.

The corpus is the standard library's docstrings (:mod:`raybackfill.data.stdlib_docs`, or ``--data``: any
labelled text table). v1 (a hashed bag of words, trained on the old classes) and v2 (character n-grams, every
class) are trained with Ray Train (:mod:`raybackfill.train.text`) and registered as ordinary encoder artefacts.
From there on nothing reads a label or a classifier, as for a team that brings two encoders:

1. the paired sample (:func:`raybackfill.adapters.sample.paired_sample`): train items embedded by both models in
   one Ray Data pass;
2. every adapter kind fitted on it and gated on held-out pairs (:func:`raybackfill.adapters.fit.train_adapter`,
   the ``--kind auto`` machinery: the best passing one is kept, the table shows them all); the label-free
   FastFill adapter, when it passes the gate, is what the backfill runs (its uncertainty orders it);
3. the online phase (:func:`raybackfill.demo.online.run_online`): the old gallery served from a live index, the
   instant phase through the adapter, then the priority backfill re-embedding with v2, under live queries.

Labels come back only to measure: old/old, new/new and every adapter's new-query top-1 / mAP on the gallery and
query splits, the backfill curves of the uncertainty order and of a band of random orders (a win inside the band
is reported as noise), report.json, report.md and the plots.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import numpy as np
import pyarrow as pa

from raybackfill.adapters.fit import AdapterConfig, FittedAdapter, auto_kinds, save_adapter, train_adapter
from raybackfill.adapters.gate import check_adapter
from raybackfill.adapters.paired import read_pairs
from raybackfill.adapters.sample import paired_sample
from raybackfill.data import storage
from raybackfill.data.preprocessing import TextPreprocessing
from raybackfill.data.schema import EMBEDDING, ID, LABEL, TEXT, SchemaError, embedding_table, vectors_of
from raybackfill.data.splits import OLD_TRAIN, TRAIN, split_table, write_splits
from raybackfill.data.stdlib_docs import PYTHON_KEY, stdlib_docstrings
from raybackfill.demo.configs import DemoConfig, TextEncoderSpec, TextScale, torch_threads
from raybackfill.demo.online import run_online
from raybackfill.demo.pipeline import (
    EVALUATION_SPLITS,
    DemoArtifacts,
    DemoLayout,
    StageTimer,
    rows_of_ids,
    write_split_embeddings,
)
from raybackfill.demo.training import train_config
from raybackfill.embed.pipeline import embed_gallery
from raybackfill.eval.findings import share_se, verdict
from raybackfill.eval.metrics import EvalConfig, RetrievalResult, evaluate
from raybackfill.eval.offline import (
    Embeddings,
    LoadedTables,
    OfflineConfig,
    Order,
    method_spaces,
    order_run,
    write_outputs,
)
from raybackfill.eval.report import adapter_section, build_report, versus_random
from raybackfill.models.transformations import apply_transformation
from raybackfill.train.quality import require_learned
from raybackfill.train.text import train_text_encoder
from raybackfill.types import AdapterDirection, AdapterKind, Method, Policy, Protocol, Tokenizer

logger = logging.getLogger(__name__)

ENCODERS = ("v1", "v2")
# Orders the label-free FastFill adapter's backfill is evaluated in: its uncertainty, and random ones (the band).
ORDERS = (Order(Policy.UNCERTAINTY), Order(Policy.RANDOM))


def run_text_demo(config: DemoConfig, *, online: bool = True) -> dict:
    """Run the text demo (Ray must be initialised) and return the report it also wrote to ``config.out``.

    Args:
        config: out directory (must be new), ``quick`` (:data:`TEXT_QUICK`) or ``text_scale``, ``data`` (a
            labelled text table instead of the docstring corpus), seed, old classes, split fractions, metric.
        online: run the online phase (live index, instant phase, backfill under queries).

    Returns:
        The report (eval.report schema plus ``adapters``, ``text_demo`` and, with ``online``, ``online``).

    Examples:
        >>> report = run_text_demo(DemoConfig(out="demo-text", quick=True))  # doctest: +SKIP
        >>> report["text_demo"]["verdicts"]["best_adapter_above_old_old"]  # doctest: +SKIP
        True
    """
    with torch_threads(config.torch_threads):
        return _run(config, online)


def _claim(layout: DemoLayout, config: DemoConfig, scale: TextScale) -> None:
    if storage.exists(layout.config):
        raise FileExistsError(f"{layout.config}: a demo already ran in {config.out}; choose a new --out")
    resolved = dataclasses.asdict(config) | {"text": True, "text_scale": dataclasses.asdict(scale), "scale": None}
    storage.write_bytes(layout.config, json.dumps(resolved, indent=2).encode())


def _run(config: DemoConfig, online: bool) -> dict:
    scale = config.resolved_text_scale()
    layout = DemoLayout(config.out)
    _claim(layout, config, scale)
    timer = StageTimer()
    load_start = os.getloadavg()[0]
    with timer("data"):
        texts, corpus = corpus_table(layout, config, scale)
        splits = split_texts(texts, layout, config)
    with timer("train encoders"):
        models, training = train_encoders(layout, splits, scale, config)
    with timer("embed"):
        embeddings = embed_gallery(
            texts, {EMBEDDING: models["old"], "new": models["new"]}, layout.path("embeddings", "all"), progress=False
        ).uri
        table = storage.read_table(embeddings)
        labels = {name: storage.read_table(uri, columns=[ID, LABEL]) for name, uri in splits.items()}
        gallery_old = write_split_embeddings(table, labels["gallery"], EMBEDDING, layout.embeddings("old", "gallery"))
    with timer("paired sample"):
        n = scale.sample or labels[TRAIN].num_rows
        sample = paired_sample(splits[TRAIN], models["old"], models["new"], n, layout.path("pairs"), seed=config.seed)
    with timer("adapters"):
        adapters, gate, fitted = fit_adapters(layout, scale, config)
    models |= adapters
    artifacts = DemoArtifacts(layout, texts, splits, models, embeddings, gallery_old)
    online_section = None
    if online:
        with timer("online"):
            online_section = online_phase(artifacts, gate, scale)
    with timer("evaluate"):
        report = evaluate_text(artifacts, table, labels, gate, fitted, scale, config)
    report["text_demo"] = {
        "corpus": corpus,
        "encoders": training,
        "paired_sample": {
            "uri": sample.uri,
            "rows": sample.rows,
            "requested": sample.requested,
            "quarantined": sample.quarantined,
            "labels_used": False,
        },
        "gate": gate,
        "verdicts": text_verdicts(report, gate["best"]),
    }
    if online_section is not None:
        report["online"] = online_section
    report["timings"] = timer.finish() | {"cpus": os.cpu_count(), "load_average": [load_start, os.getloadavg()[0]]}
    write_outputs(report, config.out)
    return report


# ---- data and encoders -----------------------------------------------------------------------------------


def corpus_table(layout: DemoLayout, config: DemoConfig, scale: TextScale) -> tuple[str, dict]:
    """The labelled text table (the docstring corpus, or ``config.data``) and what the report says of it."""
    if config.data:
        table = storage.read_table(config.data, columns=[ID, TEXT, LABEL])
        return config.data, {
            "source": config.data,
            "documents": table.num_rows,
            "classes": len(set(table.column(LABEL).to_pylist())),
        }
    table = stdlib_docstrings(scale.classes, per_class=scale.per_class, seed=config.seed)
    uri = layout.path("data", "texts")
    storage.write_table(table, uri)
    metadata = table.schema.metadata or {}
    record = {
        "source": "docstrings of the Python standard library (module or package = class)",
        "python": metadata.get(PYTHON_KEY, b"").decode(),
        "documents": table.num_rows,
        "classes": scale.classes,
        "per_class_cap": scale.per_class,
    }
    return uri, record


def split_texts(texts: str, layout: DemoLayout, config: DemoConfig) -> dict[str, str]:
    """Train / gallery / query splits and the old classes' training rows, as the image demo splits images."""
    table = storage.read_table(texts, columns=[ID, TEXT, LABEL])
    if table.column(LABEL).null_count:
        raise SchemaError(f"{texts}: the text demo needs a label on every row (to measure, and to train v1/v2)")
    parts = split_table(table, config.fractions, old_classes=config.old_classes, seed=config.seed, source=texts)
    for name in (TRAIN, OLD_TRAIN, *EVALUATION_SPLITS):
        if name not in parts:
            raise ValueError(f"the text demo needs a '{name}' split; fractions give {sorted(parts)}")
    write_splits(parts, layout.path("data", "splits"))
    return {name: layout.split(name) for name in parts}


def _preprocessing(spec: TextEncoderSpec) -> TextPreprocessing:
    return TextPreprocessing(tokenizer=spec.tokenizer, max_length=spec.max_length, vocab_size=spec.vocab_size)


def train_encoders(
    layout: DemoLayout, splits: dict[str, str], scale: TextScale, config: DemoConfig
) -> tuple[dict[str, str], dict]:
    """v1 on the old classes' training rows, v2 on every training row; returns their artefacts ("old", "new")
    and the report's record of each run."""
    models: dict[str, str] = {}
    record: dict[str, dict] = {}
    for role, name, spec, rows in (("old", "v1", scale.v1, splits[OLD_TRAIN]), ("new", "v2", scale.v2, splits[TRAIN])):
        models[role] = layout.model(name)
        kwargs = dict(spec.kwargs) | (
            {"vocab_size": spec.vocab_size} if spec.tokenizer is Tokenizer.HASHED_WORDS else {}
        )
        saved = train_text_encoder(
            rows,
            models[role],
            architecture=spec.architecture,
            kwargs=kwargs,
            preprocessing=_preprocessing(spec),
            train=train_config(name, layout, config, spec.fit),
            version=name,
        )
        t = saved.training
        record[name] = {
            "architecture": spec.architecture,
            "tokenizer": spec.tokenizer,
            "dim": saved.dims["embedding"],
            "trained_on": "old classes" if role == "old" else "all classes",
            **{k: t[k] for k in ("best_epoch", "epochs", "train_accuracy", "val_accuracy", "val_rows") if k in t},
        }
        if config.require_learning and "val_accuracy" in t:
            labels = storage.read_table(rows, columns=[LABEL]).column(LABEL).to_numpy()
            chance = float(np.bincount(labels).max() / len(labels))
            require_learned(t | {"chance_accuracy": chance, "validation_rows": int(t.get("val_rows", 0))}, name)
    return models, record


# ---- adapters --------------------------------------------------------------------------------------------


def fit_adapters(
    layout: DemoLayout, scale: TextScale, config: DemoConfig
) -> tuple[dict[str, str], dict, dict[str, FittedAdapter]]:
    """Every old -> new adapter kind on the paired sample, labels dropped, gated at ``scale.min_recall``.

    The best passing adapter is saved as ``models/adapter`` (``--kind auto``); the FastFill adapter, which the
    backfill orders by, also as ``models/adapter_fastfill`` when it passes. Returns those artefacts (keys
    ``adapter``, ``fastfill``), the report's gate section and every fitted adapter by kind."""
    pairs = dataclasses.replace(read_pairs(layout.path("pairs")), labels=None)  # label-free from here on
    adapter_config = AdapterConfig(min_recall=scale.min_recall, metric=config.metric, seed=config.seed)
    train = train_config("adapter", layout, config, scale.adapter)
    kinds = auto_kinds(AdapterDirection.OLD_TO_NEW)
    report = train_adapter(pairs, layout.model("adapter"), kinds, adapter_config, train=train, version="adapter")
    logger.info(
        "  adapters (label-free, gate recall@%d >= %.2f):\n%s", adapter_config.k, scale.min_recall, report.table()
    )
    models: dict[str, str] = {}
    if report.passed:
        models["adapter"] = layout.model("adapter")
    fastfill = next(f for f in report.fitted if f.kind is AdapterKind.FASTFILL)
    if fastfill.passes(scale.min_recall):
        models["fastfill"] = layout.model("adapter_fastfill")
        save_adapter(
            fastfill, models["fastfill"], pairs, adapter_config, source=pairs.source, version="adapter_fastfill"
        )
    best = report.chosen.kind.value if report.chosen else None
    gate = {
        "min_recall": scale.min_recall,
        "k": adapter_config.k,
        "pairs": len(pairs),
        "best": best,  # best recall@k on the held-out pairs
        "kept": best if report.passed else None,  # ... and saved, having passed the gate
        "table": report.table(),
        "adapters": {
            f.kind.value: {"score": f.score.to_dict(), "fit": f.fit, "passes": f.passes(scale.min_recall)}
            for f in report.fitted
        },
    }
    return models, gate, {f.kind.value: f for f in report.fitted}


# ---- online ----------------------------------------------------------------------------------------------


def online_phase(artifacts: DemoArtifacts, gate: dict, scale: TextScale) -> dict:
    """The gallery served live while the backfill runs under queries: the label-free FastFill adapter's instant
    phase and its uncertainty order when it passed the gate; otherwise the best passing adapter's instant phase
    in random order; with none passing, a backfill without an instant phase (rank_merge, random order)."""
    models = artifacts.models
    if "fastfill" in models:
        method, policy, adapter = Method.FASTFILL, Policy.UNCERTAINTY, models["fastfill"]
    elif "adapter" in models:
        method, policy, adapter = Method.FCT, Policy.RANDOM, models["adapter"]
    else:
        method, policy, adapter = Method.RANK_MERGE, Policy.RANDOM, None
    if adapter is not None:
        check_adapter(adapter, scale.min_recall, direction=AdapterDirection.OLD_TO_NEW)  # what `backfill` checks
        models = models | {method.value: adapter}
    online = dataclasses.replace(scale.online, method=method, policy=policy)
    section = run_online(dataclasses.replace(artifacts, models=models), online)
    return section | {"adapter": adapter, "gate_min_recall": scale.min_recall}


# ---- evaluation ------------------------------------------------------------------------------------------


def evaluate_text(
    artifacts: DemoArtifacts,
    table: pa.Table,
    labels: dict[str, pa.Table],
    gate: dict,
    fitted: dict[str, FittedAdapter],
    scale: TextScale,
    config: DemoConfig,
) -> dict:
    """Anchors (old/old, new/new, new query on each adapter's mapped gallery), the backfill curves of the
    FastFill adapter in uncertainty and random orders (several seeds: the band), and the adapters section."""
    eval_config = EvalConfig(metric=config.metric, protocol=Protocol.DISJOINT)
    q_ids, q_labels = (labels["query"].column(c).to_numpy() for c in (ID, LABEL))
    g_ids, g_labels = (labels["gallery"].column(c).to_numpy() for c in (ID, LABEL))
    q_table, g_table = table.take(rows_of_ids(table, q_ids)), table.take(rows_of_ids(table, g_ids))
    query = {"old": vectors_of(q_table, EMBEDDING), "new": vectors_of(q_table, "new")}
    gallery = {"old": vectors_of(g_table, EMBEDDING), "new": vectors_of(g_table, "new")}

    def measure(q: np.ndarray, g: np.ndarray) -> RetrievalResult:
        return evaluate(q, g, q_labels, g_labels, eval_config)

    mapped = {kind: apply_transformation(f.module, gallery["old"])[0] for kind, f in fitted.items()}
    anchors = {"old_old": measure(query["old"], gallery["old"]), "new_new": measure(query["new"], gallery["new"])}
    adapted = {kind: measure(query["new"], vectors) for kind, vectors in mapped.items()}
    anchors |= {f"new_adapter_{kind}": result for kind, result in adapted.items()}

    def embeddings(ids: np.ndarray, vectors: np.ndarray) -> Embeddings:
        return Embeddings(ids, vectors, embedding_table(ids, vectors))

    runs = []
    fastfill = artifacts.models.get("fastfill")
    if fastfill is not None:
        tables = LoadedTables(
            q_labels,
            g_labels,
            queries={name: embeddings(q_ids, query[name]) for name in ("old", "new")},
            gallery={
                "old": embeddings(g_ids, gallery["old"]),
                "new": embeddings(g_ids, gallery["new"]),
                "transformed": embeddings(g_ids, mapped[AdapterKind.FASTFILL.value]),
            },
        )
        offline = OfflineConfig(
            Method.FASTFILL,
            orders=ORDERS,
            beta_points=scale.beta_points,
            metric=config.metric,
            seed=config.seed,
            transformation=fastfill,
            random_seeds=scale.random_seeds,
        )
        spaces = method_spaces(Method.FASTFILL, tables)
        runs = [order_run(order, spaces, tables, offline, anchors["old_old"], eval_config) for order in ORDERS]
    report = build_report(anchors, runs)
    gates = {kind: {"score": g["score"], "fit": g["fit"]} for kind, g in gate["adapters"].items()}
    report["adapters"] = adapter_section(
        anchors["old_old"], anchors["new_new"], {kind: (adapted[kind], gates[kind]) for kind in adapted}, {}
    )
    return report


def text_verdicts(report: dict, best: str | None) -> dict:
    """What the text demo claims, each figure next to what it is compared with: new/new against old/old, the
    best adapter (``best``: the gate's choice on held-out pairs) against old/old, and the uncertainty order's mAP
    area against the band of random orders (``holds`` only when it clears the band by ``Z_CLEAR`` standard
    deviations; ``noise`` inside it)."""
    oo, nn = report["anchors"]["old_old"], report["anchors"]["new_new"]
    rows = {r["name"]: r for r in report["adapters"]["rows"] if r["label_free"]}
    chosen = rows.get(best) if best is not None else None
    n = report["queries"]["evaluated"]

    def versus_old_old(top1: float | None) -> dict:
        """The gap to old/old in standard errors of the two shares (as eval.findings measures it)."""
        if top1 is None:
            return {"z": None, "verdict": "missing"}
        se = math.sqrt(2) * share_se((top1 + oo["top1"]) / 2, n)
        z = (top1 - oo["top1"]) / se if se > 0 else None
        return {"z": z, "verdict": verdict(z).value}

    out: dict = {
        "new_new_top1": nn["top1"],
        "old_old_top1": oo["top1"],
        "new_new_above_old_old": nn["top1"] > oo["top1"],
        # the gate's choice (best recall@k on held-out pairs, no labels), not the best on the evaluation split
        "best_adapter": best,
        "best_adapter_top1": None if chosen is None else chosen["top1"],
        "best_adapter_above_old_old": chosen is not None and chosen["above_old_old"],
        "adapters_below_old_old": report["adapters"]["below_old_old"],
        "new_new_vs_old_old": versus_old_old(nn["top1"]),
        "best_adapter_vs_old_old": versus_old_old(None if chosen is None else chosen["top1"]),
    }
    band = [r for r in versus_random(report) if r["policy"] == Policy.UNCERTAINTY]
    if band:
        b = band[0]
        out["uncertainty_vs_random"] = {
            "auc_map": b["auc_map"],
            "random_mean": b["auc_map_random_mean"],
            "random_sd": b["auc_map_random_sd"],
            "random_orders": b["random_seeds"],
            "z": b["auc_map_z"],
            "verdict": verdict(b["auc_map_z"]).value,
        }
    else:
        out["uncertainty_vs_random"] = {"verdict": "missing", "why": "no label-free FastFill adapter passed the gate"}
    return out


def text_summary(report: dict, files: list[str]) -> str:
    """A few lines for the terminal: the corpus, the encoders, the gate table, the verdicts and the files."""
    demo = report["text_demo"]
    corpus, encoders, v = demo["corpus"], demo["encoders"], demo["verdicts"]
    lines = [
        f"corpus: {corpus['documents']} documents, {corpus['classes']} classes ({corpus['source']})",
        "encoders: "
        + "; ".join(
            f"{name} {e['architecture']} {e['dim']}-d ({e['trained_on']}), validation accuracy "
            f"{e.get('val_accuracy', float('nan')):.3f}"
            for name, e in encoders.items()
        ),
        f"paired sample: {demo['paired_sample']['rows']} train items embedded by both, labels not used",
        "",
        f"adapters on held-out pairs (gate: recall@{demo['gate']['k']} >= {demo['gate']['min_recall']}):",
        demo["gate"]["table"],
        "",
        f"old/old top-1 {v['old_old_top1']:.3f}, new/new {v['new_new_top1']:.3f}"
        f" ({'above' if v['new_new_above_old_old'] else 'NOT above'} old/old, {_z(v['new_new_vs_old_old'])})",
    ]
    if v["best_adapter"] is not None:
        lines.append(
            f"best adapter by the gate ({v['best_adapter']}): new query on the adapted old gallery top-1 "
            f"{v['best_adapter_top1']:.3f} ({'above' if v['best_adapter_above_old_old'] else 'NOT above'} "
            f"old/old, {_z(v['best_adapter_vs_old_old'])}); below old/old: "
            f"{', '.join(v['adapters_below_old_old']) or 'none'}"
        )
    u = v["uncertainty_vs_random"]
    if "z" in u:
        z = "-" if u["z"] is None else f"{u['z']:+.1f}"
        lines.append(
            f"uncertainty order mAP area {u['auc_map']:.4f} vs {u['random_orders']} random orders "
            f"{u['random_mean']:.4f} ± {u['random_sd']:.4f} (z {z}): {u['verdict']}"
        )
    else:
        lines.append(f"uncertainty order: {u['why']}")
    online = report.get("online")
    if online:
        lines.append(
            f"online: {online['method']} / {online['policy']}, {online['items']} items in "
            f"{online['seconds']:.0f}s, {online['queries']} live queries, {online['query_errors']} errors; "
            f"live top-1 {online['live_top1_before']:.3f} -> {online['live_top1_after']:.3f}"
        )
    lines.append("files: " + ", ".join(files))
    return "\n".join(lines)


def _z(gap: dict) -> str:
    z = "-" if gap["z"] is None else f"{gap['z']:+.1f}"
    return f"z {z}: {gap['verdict']}"
