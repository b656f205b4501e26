"""The project's shared vocabulary: every name that crosses a module boundary is one of these enums.

Each enum is a :class:`~enum.StrEnum`, so a member *is* its string: configs, JSON reports, Parquet columns
and command-line choices keep the plain values (``"rank_merge"``, ``"cosine"``) while code compares and
validates against one definition. :func:`parse` turns a user's string into a member with an error that
lists the valid values. :func:`locate_ids` is the one "find these ids in that id array" lookup.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

import numpy as np

__all__ = [
    "BackboneLoss",
    "Method",
    "Metric",
    "OldQuerySource",
    "Phase",
    "Policy",
    "Space",
    "Stage",
    "Strategy",
    "locate_ids",
    "parse",
]


class Strategy(StrEnum):
    """How a query is answered while the gallery is part old, part transformed, part new."""

    OLD = "old"  # old query on old embeddings until the cut-over
    COMPATIBLE = "compatible"  # new query against one index of old-compatible, transformed and new items
    RANK_MERGE = "rank_merge"  # old query on the old part, new query on the new part, merged by distance


class Metric(StrEnum):
    """Similarity of two embeddings. Scores are always "higher is better" (l2 is served negated)."""

    COSINE = "cosine"
    IP = "ip"  # inner product of unnormalised vectors
    L2 = "l2"


class Space(StrEnum):
    """Which embedding space a gallery item is served from; :attr:`code` is its int8 form in arrays."""

    OLD = "old"
    TRANSFORMED = "transformed"
    NEW = "new"

    @property
    def code(self) -> int:
        return _SPACE_ORDER.index(self)

    @classmethod
    def from_code(cls, code: int) -> Space:
        return _SPACE_ORDER[int(code)]


_SPACE_ORDER = tuple(Space)


class Policy(StrEnum):
    """The order in which a backfill re-embeds the gallery."""

    UNCERTAINTY = "uncertainty"  # FastFill: the transformation's predicted uncertainty, largest first
    ENTROPY = "entropy"  # entropy of the old classifier's softmax, largest first
    LEAST_CONFIDENCE = "least_confidence"  # 1 - the old classifier's top probability, largest first
    RANDOM = "random"
    ID = "id"  # ascending item id (the storage order of most galleries)


class Method(StrEnum):
    """A compatible-upgrade method (see :mod:`raybackfill.compat.recipes` for what each one trains)."""

    INDEPENDENT = "independent"
    BCT = "bct"
    RACT = "ract"
    FCT = "fct"
    FCT_SIDE_INFO = "fct_side_info"
    FASTFILL = "fastfill"
    FASTFILL_SIDE_INFO = "fastfill_side_info"
    RANK_MERGE = "rank_merge"
    RANK_MERGE_PSI = "rank_merge_psi"


class BackboneLoss(StrEnum):
    """What trains a new backbone."""

    CLASSIFICATION = "classification"  # independent of the old model
    BCT = "bct"  # + influence loss through the frozen old classifier
    RACT = "ract"  # + regression-alleviating contrastive loss


class OldQuerySource(StrEnum):
    """Where the old-space query comes from when a strategy needs one."""

    OLD_MODEL = "old_model"  # the old encoder is kept running for queries
    PSI = "psi"  # the reverse transformation psi(new query)


class Phase(StrEnum):
    """Where a live index is in its upgrade."""

    IDLE = "idle"
    INSTANT = "instant"  # the whole gallery enters the new space through the transformation
    BACKFILL = "backfill"  # items are re-embedded by the new model, highest priority first
    PAUSED = "paused"
    DONE = "done"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"


class Stage(StrEnum):
    """Where an item was quarantined (the ``stage`` column of quarantine and ledger rows)."""

    IMPORT = "import"  # an importer could not read the source file
    PLAN = "plan"  # the backfill plan found no old embedding or score for it
    TRANSFORM = "transform"  # the forward transformation produced a non-finite embedding
    DECODE = "decode"  # its bytes do not decode to an image or text
    EMBED = "embed"  # the encoder failed or returned a non-finite embedding


E = TypeVar("E", bound=StrEnum)


def parse(kind: type[E], value: str | E, *, what: str | None = None) -> E:
    """``value`` as a member of ``kind``, or a ``ValueError`` naming the valid values.

    Args:
        kind: the enum class, e.g. :class:`Strategy`.
        value: a member or its string value.
        what: the name used in the error (defaults to the enum's name in lower case).

    Returns:
        The member.

    Example:
        >>> parse(Strategy, "rank_merge") is Strategy.RANK_MERGE
        True
    """
    try:
        return kind(value)
    except ValueError:
        valid = ", ".join(m.value for m in kind)
        raise ValueError(f"unknown {what or kind.__name__.lower()} {value!r}; valid: {valid}") from None


def locate_ids(ids: np.ndarray, wanted: np.ndarray, *, missing: str = "raise") -> np.ndarray:
    """Row positions of ``wanted`` among the unique ``ids`` (sort + binary search, no Python dicts).

    Args:
        ids: the unique int64 ids of a table, in any order.
        wanted: the ids to find.
        missing: ``"raise"`` (a ``KeyError`` listing a few missing ids) or ``"mask"`` (missing ids get
            position ``-1``).

    Returns:
        An int64 array, one position per wanted id.

    Example:
        >>> locate_ids(np.array([30, 10, 20]), np.array([20, 30])).tolist()
        [2, 0]
    """
    ids = np.asarray(ids)
    wanted = np.asarray(wanted)
    if missing not in ("raise", "mask"):
        raise ValueError(f"missing must be 'raise' or 'mask', got {missing!r}")
    if len(ids) == 0:
        found = np.zeros(len(wanted), dtype=bool)
        where = np.zeros(len(wanted), dtype=np.int64)
    else:
        order = np.argsort(ids, kind="stable")
        slot = np.minimum(np.searchsorted(ids[order], wanted), len(ids) - 1)
        where = order[slot].astype(np.int64)
        found = ids[where] == wanted
    if found.all():
        return where
    if missing == "raise":
        absent = wanted[~found]
        raise KeyError(f"{len(absent)} id(s) not found, e.g. {absent[:5].tolist()}")
    return np.where(found, where, -1)
