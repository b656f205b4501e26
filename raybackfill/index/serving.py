"""Which strategy answers a query in each phase of an upgrade, and which query spaces each strategy needs.

One table for every client of the index (the HTTP service, `raybackfill query`, the demo): a query that names
no strategy gets the one its index's phase serves best.

- Before the backfill (``idle``) and after a rollback only the old space exists: ``old``.
- While the gallery is mixed (``instant``, ``backfill``, ``paused``) the method decides: ``compatible`` for
  methods whose new model or transformation makes one space (BCT, RACT, FCT, FastFill), ``rank_merge`` for
  the rest, ``old`` for an independent model served only after the cut-over (the method's recipe says which).
- Once every item is in the new space (``done``, ``promoted``): ``compatible``, a new query against the new
  space; after a promote the promoted generation is the only space served, so the same new-model query
  keeps working unchanged across the promote.
"""

from __future__ import annotations

from raybackfill.types import Phase, Space, Strategy, parse

# The spaces whose query each strategy needs.
QUERY_SPACES: dict[Strategy, tuple[Space, ...]] = {
    Strategy.OLD: (Space.OLD,),
    Strategy.COMPATIBLE: (Space.NEW,),
    Strategy.RANK_MERGE: (Space.OLD, Space.NEW),
}

MIXED_PHASES = (Phase.INSTANT, Phase.BACKFILL, Phase.PAUSED)
OLD_ONLY_PHASES = (Phase.IDLE, Phase.ROLLED_BACK)
NEW_ONLY_PHASES = (Phase.DONE, Phase.PROMOTED)


def serving_strategy(phase: Phase | str, during: Strategy | str = Strategy.RANK_MERGE) -> Strategy:
    """The strategy that serves an index in ``phase`` best.

    Args:
        phase: the index's phase (``progress().phase``).
        during: what serves the mixed phases (instant, backfill, paused): the upgrade method's
            ``Recipe.query_strategy``; rank merge (the choice that needs no compatibility) by default.

    Returns:
        ``old`` before the backfill and after a rollback, ``during`` while the gallery is mixed, ``compatible``
        once every item is in the new space.

    Example:
        >>> serving_strategy("backfill", during="compatible").value
        'compatible'
        >>> serving_strategy("promoted").value
        'compatible'
    """
    phase = parse(Phase, phase)
    if phase in OLD_ONLY_PHASES:
        return Strategy.OLD
    if phase in NEW_ONLY_PHASES:
        return Strategy.COMPATIBLE
    return parse(Strategy, during)
