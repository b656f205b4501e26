"""`raybackfill demo --chain`: a third backbone v3, the FastFill transformation h23 (v2 -> v3), and the chained
upgrade v1 -> v2 -> v3 evaluated on the demo's gallery and queries (:mod:`raybackfill.eval.chain`).

v1 is the demo's old model, v2 its new one (independent training) and h12 its FastFill transformation (without
side-information, whose uncertainty orders v2's backfill). v3 trains as v2 does (every train class, the
learning rate the search chose) with a wider trunk; h23 trains exactly as h12 does (``train_forward``), on the
train split's v2 and v3 embeddings. Whether v3 is the better model is read on the validation share its own run
held out of the train split (the same rows as v2's: same split, same seed), never on the gallery or queries,
and recorded in the section's ``v3`` entry.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raybackfill.data import storage
from raybackfill.data.schema import EMBEDDING, ID, LABEL, vectors_of
from raybackfill.data.splits import TRAIN
from raybackfill.demo.configs import DemoConfig, DemoScale
from raybackfill.demo.pipeline import DemoArtifacts, DemoLayout, rows_of_ids, write_split_embeddings
from raybackfill.demo.training import backbone_summary, check_backbone, train_config, train_forward
from raybackfill.embed.pipeline import embed_gallery
from raybackfill.eval.chain import ChainConfig, ChainVectors, evaluate_chain
from raybackfill.eval.metrics import EvalConfig
from raybackfill.models.artifacts import load_model
from raybackfill.models.transformations import apply_transformation
from raybackfill.train.api import train_backbone
from raybackfill.types import Method, Protocol

logger = logging.getLogger(__name__)

V3 = "v3"
H23 = "h23"
# The chain's v2 and its transformation from v1: the demo's new model and its FastFill head.
V2_MODEL, H12_METHOD = "new", Method.FASTFILL


@dataclass(frozen=True)
class ChainArtifacts:
    """What the chain's training stage produced: the v3 backbone and h23 (``models``), every image under v3
    (``embeddings``, column ``embedding``) and v3's validation figures against v2's (``v3_quality``)."""

    models: dict[str, str]
    embeddings: str
    v3_quality: dict


def train_chain(
    layout: DemoLayout,
    images: str,
    train_split: str,
    train_labels: pa.Table,
    v2_train: str,
    models: dict[str, str],
    backbone_lr: float,
    scale: DemoScale,
    config: DemoConfig,
) -> ChainArtifacts:
    """Train v3 on ``train_split`` (every train class) at ``backbone_lr``, embed every image with it, and train
    h23 from the train split's v2 embeddings (``v2_train``) to its v3 ones. ``models`` are the demo's (v2 is
    ``models["new"]``)."""
    v3 = layout.model(V3)
    fit = dataclasses.replace(scale.v3 or scale.new, lr=backbone_lr)
    start = time.perf_counter()
    spec = train_backbone(
        train_split,
        v3,
        method=Method.INDEPENDENT,
        train=train_config(V3, layout, config, fit),
        augment=fit.augment,
        version=V3,
        embedding_dim=scale.embedding_dim,
        backbone_kwargs={"width": scale.resolved_v3_width()},
    )
    check_backbone(V3, spec, time.perf_counter() - start, config)
    quality = v3_quality(backbone_summary(v3), backbone_summary(models[V2_MODEL]))
    quality |= {"width": scale.resolved_v3_width(), "v2_width": scale.width}
    if not quality["above_v2"]:
        logger.warning(
            "  v3 is not above v2 on the validation split (%s vs %s): the chain upgrades to a model no better",
            quality["val_accuracy"],
            quality["v2_val_accuracy"],
        )
    # embed_gallery names its first model's column ``embedding``: here that is v3.
    embeddings = embed_gallery(images, {EMBEDDING: v3}, layout.path("embeddings", "v3-all"), progress=False).uri
    table = storage.read_table(embeddings)
    v3_train = write_split_embeddings(table, train_labels, EMBEDDING, layout.embeddings(V3, TRAIN), model=V3)
    start = time.perf_counter()
    h23 = train_forward(layout, H12_METHOD, v2_train, v3_train, v3, scale, config, name=H23)
    logger.info("  h23 (v2 -> v3, %s): %.1fs", H12_METHOD, time.perf_counter() - start)
    return ChainArtifacts({V3: v3, H23: h23}, embeddings, quality)


def v3_quality(v3: dict, v2: dict) -> dict:
    """v3's and v2's accuracy on their validation split (the train accuracy when a run held none out) and
    whether v3 is strictly above."""
    key = "val_accuracy" if "val_accuracy" in v3 and "val_accuracy" in v2 else "train_accuracy"
    return {
        "measured_on": "validation split of train" if key == "val_accuracy" else "train split",
        "val_accuracy": v3[key],
        "v2_val_accuracy": v2[key],
        "above_v2": bool(v3[key] > v2[key]),
        "best_epoch": v3["best_epoch"],
    }


def evaluate_demo_chain(
    artifacts: DemoArtifacts,
    chain: ChainArtifacts,
    table: pa.Table,
    labels: dict[str, pa.Table],
    scale: DemoScale,
    config: DemoConfig,
) -> dict:
    """The report's ``chain`` section on the gallery and query splits (:func:`raybackfill.eval.chain.evaluate_chain`)
    plus ``v3`` (its validation figures against v2's) and ``models`` (what plays v1, v2, v3, h12 and h23).

    ``table``: every image under the demo's backbones (``embedding`` = v1, ``new`` = v2); v3's vectors come from
    ``chain.embeddings``."""
    q_ids, q_labels = (labels["query"].column(c).to_numpy() for c in (ID, LABEL))
    g_ids, g_labels = (labels["gallery"].column(c).to_numpy() for c in (ID, LABEL))
    v3_table = storage.read_table(chain.embeddings, columns=[ID, EMBEDDING])

    def rows(source: pa.Table, ids: np.ndarray, column: str) -> np.ndarray:
        return vectors_of(source.take(rows_of_ids(source, ids)), column)

    h12 = load_model(artifacts.models[H12_METHOD]).module
    h23 = load_model(chain.models[H23]).module
    phi1, phi2, phi3 = rows(table, g_ids, EMBEDDING), rows(table, g_ids, V2_MODEL), rows(v3_table, g_ids, EMBEDDING)
    h12_phi1, u12 = apply_transformation(h12, phi1)
    h23_phi2, u23_phi2 = apply_transformation(h23, phi2)
    h23_h12, u23_h12 = apply_transformation(h23, h12_phi1)
    if u12 is None or u23_phi2 is None or u23_h12 is None:
        raise ValueError(f"the chain orders its backfills by FastFill uncertainty: {H12_METHOD} must return one")
    vectors = ChainVectors(
        query_labels=q_labels,
        gallery_labels=g_labels,
        gallery_ids=g_ids,
        queries={
            "v1": rows(table, q_ids, EMBEDDING),
            "v2": rows(table, q_ids, V2_MODEL),
            "v3": rows(v3_table, q_ids, EMBEDDING),
        },
        phi1=phi1,
        phi2=phi2,
        phi3=phi3,
        h12=h12_phi1,
        h23_v2=h23_phi2,
        h23_h12=h23_h12,
        u12=u12.reshape(-1),
        u23_v2=u23_phi2.reshape(-1),
        u23_h12=u23_h12.reshape(-1),
    )
    chain_config = ChainConfig(
        v2_fraction=config.chain_v2_fraction,
        beta_points=scale.beta_points,
        random_seeds=scale.random_seeds,
        seed=config.seed,
        eval_config=EvalConfig(metric=config.metric, protocol=Protocol.DISJOINT),
    )
    section = evaluate_chain(vectors, chain_config)
    section["v3"] = chain.v3_quality
    section["models"] = {"v1": "old", "v2": V2_MODEL, "v3": V3, "h12": H12_METHOD.value, "h23": H23}
    return section
