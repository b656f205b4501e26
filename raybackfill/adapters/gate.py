"""The quality gate: refuse an adapter whose recorded held-out score is below the bar the user sets.

`raybackfill train adapter` records the score in the artefact's model.json (``adapter.score``, see
:mod:`raybackfill.adapters.scores`); commands that serve or backfill with an adapter call :func:`check_adapter`
before doing anything, so a poor adapter never reaches the index.
"""

from __future__ import annotations

from raybackfill.models.artifacts import MODEL_JSON, read_spec
from raybackfill.types import AdapterDirection, parse


class AdapterGateError(ValueError):
    """An adapter is below the bar, has no recorded score, or maps the wrong way; the message says which."""


def check_adapter(artifact: str, min_recall: float | None, *, direction: AdapterDirection | str | None = None) -> dict:
    """Refuse ``artifact`` unless its recorded recall@k on held-out pairs is at least ``min_recall``.

    Args:
        artifact: the adapter (or any transformation) artefact directory.
        min_recall: the bar, in [0, 1]; None checks nothing but the direction (a transformation trained with
            labels has no adapter record and passes).
        direction: when given, the direction the caller runs the adapter in (the backfill: ``old-to-new``).

    Returns:
        The artefact's adapter record (empty for a transformation that is not an adapter).

    Raises:
        AdapterGateError: below the bar, no recorded score while a bar is set, or the other direction.

    Examples:
        >>> check_adapter("models/adapter", 0.9, direction="old-to-new")  # doctest: +SKIP
    """
    if min_recall is not None and not 0.0 <= min_recall <= 1.0:
        raise ValueError(f"min_recall must be in [0, 1], got {min_recall}")
    spec = read_spec(artifact)  # model.json only
    record = spec.adapter
    source = f"{artifact.rstrip('/')}/{MODEL_JSON}"
    if direction is not None and record:
        wanted = parse(AdapterDirection, direction, what="direction")
        if record.get("direction") != wanted.value:
            raise AdapterGateError(
                f"{source}: adapter maps {record.get('direction')}, but this step needs {wanted.value}"
            )
    if min_recall is None:
        return record
    score = record.get("score", {})
    if "recall" not in score:
        raise AdapterGateError(
            f"{source}: no recorded adapter score (fit it with `raybackfill train adapter`, or drop the "
            "minimum recall to use it ungated)"
        )
    if float(score["recall"]) < min_recall:
        raise AdapterGateError(
            f"{source}: adapter {record.get('kind')} recall@{score.get('k')} {float(score['recall']):.4f} on "
            f"{score.get('pairs')} held-out pairs is below the required {min_recall:.4f}"
        )
    return record
