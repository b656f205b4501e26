"""raybackfill: upgrade the embedding model of a retrieval service without downtime.

The public API, importable from the package itself (``from raybackfill import run_backfill``); each name is
loaded on first use, so ``import raybackfill`` stays cheap and does not import Ray or torch.

Encoders (any v1 and v2: raybackfill's own, TorchScript, ``torch.export``, torchvision, a trusted entrypoint):
    :func:`register_encoder`, :class:`EncoderSource`, :func:`load_encoder`, :class:`Encoder`,
    :class:`EntrypointTrust`.
Training on Ray Train:
    :func:`train_backbone` (independent, BCT, RACT), :func:`train_side_info`, :func:`train_transformation`
    (FCT, FastFill), :func:`train_reverse` (psi for rank merge), :class:`TrainConfig`.
Embedding with Ray Data:
    :func:`embed_gallery`, :class:`PoolConfig`.
The live index (Ray actors):
    :func:`create_index`, :func:`connect`, :func:`destroy_index`, :class:`RouterConfig`;
    aliases for blue/green switches: :func:`set_alias`, :func:`get_alias`, :func:`list_aliases`,
    :func:`remove_alias`.
The backfill:
    :func:`run_backfill`, :class:`BackfillConfig`, :class:`BackfillSummary`.
Evaluation:
    :func:`evaluate_tables`, :class:`EvalInputs`, :class:`OfflineConfig`.
The vocabulary (:mod:`raybackfill.types`):
    :class:`Method`, :class:`Strategy`, :class:`Policy`, :class:`Metric`, :class:`Space`, :class:`Phase`,
    :class:`Stage`.

Example:
    >>> import raybackfill
    >>> raybackfill.Strategy.RANK_MERGE == "rank_merge"
    True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Every entry point (jobs, CLI, tests) attaches to named actors in this namespace.
NAMESPACE = "raybackfill"

_EXPORTS: dict[str, str] = {
    # encoders
    "Encoder": "raybackfill.encoders.encoder",
    "EntrypointTrust": "raybackfill.encoders.encoder",
    "load_encoder": "raybackfill.encoders.encoder",
    "EncoderSource": "raybackfill.encoders.register",
    "register_encoder": "raybackfill.encoders.register",
    # training
    "TrainConfig": "raybackfill.train.trainer",
    "train_backbone": "raybackfill.train.api",
    "train_side_info": "raybackfill.train.api",
    "train_transformation": "raybackfill.train.api",
    "train_reverse": "raybackfill.train.api",
    # embedding
    "PoolConfig": "raybackfill.embed.pipeline",
    "embed_gallery": "raybackfill.embed.pipeline",
    # the live index
    "IndexSearcher": "raybackfill.index.router",
    "RouterConfig": "raybackfill.index.router",
    "connect": "raybackfill.index.router",
    "create_index": "raybackfill.index.router",
    "destroy_index": "raybackfill.index.router",
    "get_alias": "raybackfill.index.aliases",
    "list_aliases": "raybackfill.index.aliases",
    "remove_alias": "raybackfill.index.aliases",
    "set_alias": "raybackfill.index.aliases",
    # the backfill
    "BackfillConfig": "raybackfill.backfill.run",
    "BackfillSummary": "raybackfill.backfill.run",
    "run_backfill": "raybackfill.backfill.run",
    # evaluation
    "EvalInputs": "raybackfill.eval.offline",
    "OfflineConfig": "raybackfill.eval.offline",
    "evaluate_tables": "raybackfill.eval.offline",
    # vocabulary
    "Method": "raybackfill.types",
    "Metric": "raybackfill.types",
    "Phase": "raybackfill.types",
    "Policy": "raybackfill.types",
    "Space": "raybackfill.types",
    "Stage": "raybackfill.types",
    "Strategy": "raybackfill.types",
}

__all__ = [
    "NAMESPACE",
    "__version__",
    "BackfillConfig",
    "BackfillSummary",
    "Encoder",
    "EncoderSource",
    "EntrypointTrust",
    "EvalInputs",
    "IndexSearcher",
    "Method",
    "Metric",
    "OfflineConfig",
    "Phase",
    "Policy",
    "PoolConfig",
    "RouterConfig",
    "Space",
    "Stage",
    "Strategy",
    "TrainConfig",
    "connect",
    "create_index",
    "destroy_index",
    "embed_gallery",
    "evaluate_tables",
    "get_alias",
    "list_aliases",
    "load_encoder",
    "register_encoder",
    "remove_alias",
    "run_backfill",
    "set_alias",
    "train_backbone",
    "train_reverse",
    "train_side_info",
    "train_transformation",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'raybackfill' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from raybackfill.backfill.run import BackfillConfig, BackfillSummary, run_backfill
    from raybackfill.embed.pipeline import PoolConfig, embed_gallery
    from raybackfill.encoders.encoder import Encoder, EntrypointTrust, load_encoder
    from raybackfill.encoders.register import EncoderSource, register_encoder
    from raybackfill.eval.offline import EvalInputs, OfflineConfig, evaluate_tables
    from raybackfill.index.aliases import get_alias, list_aliases, remove_alias, set_alias
    from raybackfill.index.router import IndexSearcher, RouterConfig, connect, create_index, destroy_index
    from raybackfill.train.api import train_backbone, train_reverse, train_side_info, train_transformation
    from raybackfill.train.trainer import TrainConfig
    from raybackfill.types import Method, Metric, Phase, Policy, Space, Stage, Strategy
