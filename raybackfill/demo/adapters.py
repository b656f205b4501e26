"""The demo's label-free adapters: every adapter kind fitted between the old and the new model's stored train
embeddings, without labels or the new model's classifier (:mod:`raybackfill.adapters`), so the report can set
them beside FCT and FastFill, which were trained with both.

The pairs are the train split's own rows (each train item embedded by both models), with their labels dropped:
the fits, their validation rows (lambda, rank, epoch) and the gate's held-out pairs all come from them. The
evaluation split is never seen. Each adapter is saved as the transformation artefact `raybackfill train adapter`
would write, with its gate score in model.json.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from raybackfill.adapters.fit import AdapterConfig, AdapterReport, auto_kinds, fit_adapter, save_adapter
from raybackfill.adapters.paired import Pairs
from raybackfill.data import storage
from raybackfill.data.schema import ID, vectors_of
from raybackfill.demo.configs import DemoConfig, DemoScale
from raybackfill.demo.pipeline import DemoLayout
from raybackfill.demo.training import train_config
from raybackfill.types import AdapterDirection, AdapterKind, locate_ids

logger = logging.getLogger(__name__)

ADAPTER_PREFIX = "adapter_"


def adapter_model_name(kind: AdapterKind | str) -> str:
    """The key (and directory under models/) of an adapter kind's artefact: ``adapter_procrustes``, ..."""
    return f"{ADAPTER_PREFIX}{AdapterKind(kind).value}"


@dataclass(frozen=True)
class DemoAdapters:
    """The adapters fitted: each kind's artefact URI, the gate table's report and how many pairs they saw."""

    models: dict[str, str]  # adapter_model_name(kind) -> artefact
    report: AdapterReport
    pairs: int


def train_pairs(old_train: str, new_train: str, *, version_old: str = "old", version_new: str = "new") -> Pairs:
    """The train split's stored old and new embeddings as pairs, matched by id, without labels."""
    old = storage.read_table(old_train).sort_by(ID)
    new = storage.read_table(new_train)
    rows = locate_ids(new.column(ID).to_numpy(), old.column(ID).to_numpy())
    ids = old.column(ID).to_numpy().astype(np.int64)
    return Pairs(
        ids,
        vectors_of(old),
        vectors_of(new)[rows],
        old_version=version_old,
        new_version=version_new,
        source=f"{old_train} + {new_train}",
    )


def fit_demo_adapters(
    layout: DemoLayout, old_train: str, new_train: str, scale: DemoScale, config: DemoConfig
) -> DemoAdapters:
    """Fit every old-to-new adapter kind on the train split's pairs (no labels) and save each one under
    ``models/adapter_<kind>``. No bar is set: the demo reports every adapter, good or bad, next to FCT.

    Args:
        layout: the demo's out directory layout (artefacts and Ray Train runs go under it).
        old_train: the train split's stored old embeddings; new_train: its new ones (matched by id).
        scale: the MLP widths and the Fit of the trained kinds (the transformations' budget, so the comparison
            with FCT is at equal training).
        config: metric, seed, Ray Train workers.

    Returns:
        The :class:`DemoAdapters`: each artefact, the gate table and the number of pairs.

    Examples:
        >>> adapters = fit_demo_adapters(layout, "emb/old/train", "emb/new/train", QUICK, config)  # doctest: +SKIP
        >>> print(adapters.report.table())  # doctest: +SKIP
    """
    pairs = train_pairs(old_train, new_train)
    adapter_config = AdapterConfig(
        direction=AdapterDirection.OLD_TO_NEW,
        metric=config.metric,
        seed=config.seed,
        hidden_dim=scale.hidden_dim,
        mixer_dim=scale.mixer_dim,
    )
    train = train_config("adapter", layout, config, scale.transformation)
    fitted = [fit_adapter(kind, pairs, adapter_config, train) for kind in auto_kinds(AdapterDirection.OLD_TO_NEW)]
    models = {}
    for adapter in fitted:
        name = adapter_model_name(adapter.kind)
        models[name] = layout.model(name)
        save_adapter(adapter, models[name], pairs, adapter_config, source=pairs.source, version=name)
    report = AdapterReport(fitted, None, None, None)
    logger.info("  label-free adapters on %d train pairs:\n%s", len(pairs), report.table())
    return DemoAdapters(models, report, len(pairs))
