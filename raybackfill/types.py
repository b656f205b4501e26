"""The project's shared vocabulary: every name that crosses a module boundary is one of these enums.

Each enum is a :class:`~enum.StrEnum`, so a member *is* its string: configs, JSON reports, Parquet columns
and command-line choices keep the plain values (``"rank_merge"``, ``"cosine"``) while code compares and
validates against one definition. :func:`parse` turns a user's string into a member with an error that
lists the valid values. :func:`locate_ids` (and :func:`locate_sorted`, for an id array kept sorted) is the
one "find these ids in that id array" lookup.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import TypeVar

import numpy as np

__all__ = [
    "CLOSED_FORM_ADAPTERS",
    "ENCODER_STAGES",
    "MODEL_METRICS",
    "AdapterDirection",
    "AdapterKind",
    "AdapterLoss",
    "BackboneLoss",
    "EncoderKind",
    "Interpolation",
    "Layout",
    "Method",
    "Metric",
    "Modality",
    "OldQuerySource",
    "Phase",
    "Policy",
    "Protocol",
    "Space",
    "Stage",
    "Strategy",
    "TargetHealth",
    "Tokenizer",
    "locate_ids",
    "locate_sorted",
    "parse",
]


class _Term(StrEnum):
    """A vocabulary enum. Its repr is its value's, so configs, dicts and error messages that show a member
    (``strategy 'old' needs ...``, ``IndexConfig(metric='cosine', ...)``) read as they did with plain strings."""

    def __repr__(self) -> str:
        return repr(self.value)


class Strategy(_Term):
    """How a query is answered while the gallery is part old, part transformed, part new."""

    OLD = "old"  # old query on old embeddings until the cut-over
    COMPATIBLE = "compatible"  # new query against one index of old-compatible, transformed and new items
    RANK_MERGE = "rank_merge"  # old query on the old part, new query on the new part, merged by distance


class Metric(_Term):
    """Similarity of two embeddings. Scores are always "higher is better" (l2 is served negated)."""

    COSINE = "cosine"
    IP = "ip"  # inner product of unnormalised vectors
    L2 = "l2"


# The metrics models are trained and evaluated with; ip (raw inner product) is an option of the serving index.
MODEL_METRICS = (Metric.COSINE, Metric.L2)


class Protocol(_Term):
    """How an offline evaluation pairs queries with the gallery."""

    DISJOINT = "disjoint"  # queries and gallery are separate sets
    LEAVE_ONE_OUT = "leave_one_out"  # query i is gallery item i; a query never retrieves itself


class Space(_Term):
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


class Layout(_Term):
    """How a serving index stores its vectors, which decides how an item leaves it (raybackfill.index.kinds)."""

    CODES = "codes"  # one code row per vector (Flat, PQ, SQ): rows are edited in place
    IVF = "ivf"  # inverted lists: removed by id through a hashtable direct map
    GRAPH = "graph"  # HNSW and other indexes without removal: rows are marked deleted, rebuilt past a threshold


class Policy(_Term):
    """The order in which a backfill re-embeds the gallery."""

    UNCERTAINTY = "uncertainty"  # FastFill: the transformation's predicted uncertainty, largest first
    ENTROPY = "entropy"  # entropy of the old classifier's softmax, largest first
    LEAST_CONFIDENCE = "least_confidence"  # 1 - the old classifier's top probability, largest first
    RANDOM = "random"
    ID = "id"  # ascending item id (the storage order of most galleries)


class Method(_Term):
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


class BackboneLoss(_Term):
    """What trains a new backbone."""

    CLASSIFICATION = "classification"  # independent of the old model
    BCT = "bct"  # + influence loss through the frozen old classifier
    RACT = "ract"  # + regression-alleviating contrastive loss


class OldQuerySource(_Term):
    """Where the old-space query comes from when a strategy needs one."""

    OLD_MODEL = "old_model"  # the old encoder is kept running for queries
    PSI = "psi"  # the reverse transformation psi(new query)


class Phase(_Term):
    """Where a live index is in its upgrade."""

    IDLE = "idle"
    INSTANT = "instant"  # the whole gallery enters the new space through the transformation
    BACKFILL = "backfill"  # items are re-embedded by the new model, highest priority first
    PAUSED = "paused"
    DONE = "done"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"


class TargetHealth(_Term):
    """How the index an alias points to answers (`raybackfill alias show`)."""

    OK = "ok"  # the router and every shard answer
    UNAVAILABLE = "unavailable"  # the router or a shard is dead, restarting or too slow
    MISSING = "missing"  # no index of that name runs (stopped, or never started)


class Stage(_Term):
    """Where an item was quarantined (the ``stage`` column of quarantine and ledger rows)."""

    IMPORT = "import"  # an importer could not read the source file
    PLAN = "plan"  # the backfill plan found no old embedding or score for it
    TRANSFORM = "transform"  # the forward transformation produced a non-finite embedding
    DECODE = "decode"  # its bytes do not decode to an image or text
    EMBED = "embed"  # the encoder failed or returned a non-finite embedding
    LOAD = "load"  # serve's loader: a stored old embedding is null, non-finite, zero (cosine), or its id repeats


# The stages of one pass through an encoder (an embed job, a backfill's re-embedding): on resume the pass skips
# the ids it quarantined at these stages, as it skips those it wrote.
ENCODER_STAGES = (Stage.DECODE, Stage.EMBED)


class EncoderKind(_Term):
    """Where a model comes from, and so how it is loaded (the ``kind`` of model.json)."""

    RAYBACKFILL = "raybackfill"  # trained by raybackfill: a registered architecture + safetensors
    TORCHSCRIPT = "torchscript"  # a ``torch.jit.save`` file
    TORCH_EXPORT = "torch_export"  # a ``torch.export.save`` program (.pt2)
    TORCHVISION = "torchvision"  # a torchvision architecture by name + the user's weights
    ENTRYPOINT = "entrypoint"  # ``package.module:factory``: user code, honoured only when trusted


class AdapterKind(_Term):
    """How an adapter between two encoders' spaces is fitted on a paired sample (raybackfill.adapters)."""

    PROCRUSTES = "procrustes"  # orthogonal (semi-orthogonal across dims) map, closed form by SVD
    AFFINE = "affine"  # ridge regression with a bias, closed form; lambda chosen on validation pairs
    LOWRANK = "lowrank"  # reduced-rank ridge regression: an affine map of rank r, closed form
    MLP = "mlp"  # the FCT MLP (or psi's) trained on Ray Train with a label-free loss
    FASTFILL = "fastfill"  # the FCT MLP plus FastFill's uncertainty head, on the label-free loss


# The adapter kinds fitted in closed form (no Ray Train run).
CLOSED_FORM_ADAPTERS = (AdapterKind.PROCRUSTES, AdapterKind.AFFINE, AdapterKind.LOWRANK)


class AdapterDirection(_Term):
    """Which way an adapter maps: old -> new (phi: the gallery's instant phase) or new -> old (psi: queries)."""

    OLD_TO_NEW = "old-to-new"
    NEW_TO_OLD = "new-to-old"


class AdapterLoss(_Term):
    """The label-free loss a trained adapter minimises against the true embedding of the pair."""

    MSE = "mse"  # mean squared error per dimension
    COSINE = "cosine"  # 1 - cosine similarity
    MSE_COSINE = "mse_cosine"  # the sum of both


class Modality(_Term):
    """What a gallery row holds, and so which column an encoder reads."""

    IMAGE = "image"
    TEXT = "text"

    @property
    def column(self) -> str:
        return self.value


class Interpolation(_Term):
    """How an image is resized before the centre crop."""

    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    NEAREST = "nearest"


class Tokenizer(_Term):
    """How texts reach the encoder.

    ``none``: the strings themselves (an entrypoint tokenises with its own tokenizer). ``bytes``: UTF-8 bytes,
    each id = byte + 1 (0 pads). ``hashed_words``: lower-cased ``\\w+`` words, each id = a stable hash of the
    word into ``1..vocab_size - 1`` (0 pads). Ids are int64, padded or cut to ``max_length``.
    """

    NONE = "none"
    BYTES = "bytes"
    HASHED_WORDS = "hashed_words"


E = TypeVar("E", bound=StrEnum)


def parse(kind: type[E], value: str | E, *, what: str | None = None, among: Iterable[E] | None = None) -> E:
    """``value`` as a member of ``kind``, or a ``ValueError`` naming the valid values.

    Args:
        kind: the enum class, e.g. :class:`Strategy`.
        value: a member or its string value.
        what: the name used in the error (defaults to the enum's name in lower case).
        among: the members this caller supports, when it supports only some (e.g. a model's metric is
            cosine or l2; ip is an index option). Defaults to every member.

    Returns:
        The member.

    Example:
        >>> parse(Strategy, "rank_merge") is Strategy.RANK_MERGE
        True
    """
    valid = tuple(kind) if among is None else tuple(among)
    try:
        member = kind(value)
    except ValueError:
        member = None
    if member not in valid:
        names = ", ".join(m.value for m in valid)
        raise ValueError(f"unknown {what or kind.__name__.lower()} {value!r}; valid: {names}") from None
    return member


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
    order = np.argsort(ids, kind="stable")
    where = locate_sorted(ids[order], wanted, missing=missing)
    return np.where(where >= 0, order[where], -1) if len(order) else where


def locate_sorted(sorted_ids: np.ndarray, wanted: np.ndarray, *, missing: str = "raise") -> np.ndarray:
    """Positions of ``wanted`` in ``sorted_ids``, an ascending array of unique values kept sorted by its owner.

    :func:`locate_ids` without the sort, for a caller that looks up many batches in one array (a shard's ids,
    a plan's ranked ids). ``wanted`` may have any shape; the result has the same shape.

    Args:
        sorted_ids: unique values in ascending order.
        wanted: the values to find.
        missing: ``"raise"`` (a ``KeyError`` listing a few missing values) or ``"mask"`` (position ``-1``).

    Returns:
        An int64 array of positions into ``sorted_ids``.

    Example:
        >>> locate_sorted(np.array([10, 20, 30]), np.array([30, 15]), missing="mask").tolist()
        [2, -1]
    """
    sorted_ids = np.asarray(sorted_ids)
    wanted = np.asarray(wanted)
    if missing not in ("raise", "mask"):
        raise ValueError(f"missing must be 'raise' or 'mask', got {missing!r}")
    if len(sorted_ids) == 0:
        found = np.zeros(wanted.shape, dtype=bool)
        where = np.zeros(wanted.shape, dtype=np.int64)
    else:
        where = np.minimum(np.searchsorted(sorted_ids, wanted), len(sorted_ids) - 1).astype(np.int64)
        found = sorted_ids[where] == wanted
    if found.all():
        return where
    if missing == "raise":
        absent = wanted[~found]
        raise KeyError(f"{len(absent)} id(s) not found, e.g. {absent[:5].tolist()}")
    return np.where(found, where, -1)
