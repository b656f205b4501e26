"""What each compatible-upgrade method trains and how it serves queries during the backfill.

Training jobs, the backfill orchestrator and the query router all read the same :class:`Recipe`, so a
method is described in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from raybackfill.types import BackboneLoss, Method, OldQuerySource, Strategy, parse


@dataclass(frozen=True)
class Recipe:
    """One method.

    backbone_loss: what trains the new model: ``classification`` (independent), ``bct`` (+ influence
        loss through the frozen old classifier), ``ract`` (+ regression-alleviating contrastive loss).
    forward_transformation: an old -> new transformation exists, so the whole gallery enters the new
        space at once (the instant phase) before the new model backfills item by item.
    side_info: the transformation also reads a side-information embedding stored next to each old one.
    uncertainty: the transformation predicts a per-item uncertainty that orders the backfill.
    reverse_transformation: psi (new -> old) is trained, giving the old-space query from the new model.
    query_strategy: ``compatible`` (new query vs one index holding old-compatible, transformed and new
        embeddings), ``rank_merge`` (old query on the not-yet-backfilled part, new query on the
        backfilled part, merged by distance) or ``old`` (old query on old embeddings until the cut-over).
    old_query_source: where the old-space query comes from when one is needed (``rank_merge``, ``old``).
    """

    name: Method
    backbone_loss: BackboneLoss
    forward_transformation: bool = False
    side_info: bool = False
    uncertainty: bool = False
    reverse_transformation: bool = False
    query_strategy: Strategy = Strategy.COMPATIBLE
    old_query_source: OldQuerySource | None = None

    def __post_init__(self) -> None:
        fields = [
            ("name", Method, "method"),
            ("backbone_loss", BackboneLoss, "backbone_loss"),
            ("query_strategy", Strategy, "query_strategy"),
        ]
        if self.old_query_source is not None:
            fields.append(("old_query_source", OldQuerySource, "old_query_source"))
        for name, kind, what in fields:
            try:
                object.__setattr__(self, name, parse(kind, getattr(self, name), what=what))
            except ValueError as err:
                raise ValueError(f"{self.name}: {err}") from None
        needs_old_query = self.query_strategy in (Strategy.RANK_MERGE, Strategy.OLD)
        if needs_old_query != (self.old_query_source is not None):
            raise ValueError(f"{self.name}: old_query_source is needed exactly for rank_merge and old strategies")
        if (self.old_query_source is OldQuerySource.PSI) != self.reverse_transformation:
            raise ValueError(f"{self.name}: the old query comes from psi exactly when psi is trained")
        if (self.side_info or self.uncertainty) and not self.forward_transformation:
            raise ValueError(f"{self.name}: side_info and uncertainty belong to a forward transformation")


_NEW = BackboneLoss.CLASSIFICATION  # a new backbone trained on its own (no compatibility loss)

RECIPES: dict[Method, Recipe] = {
    r.name: r
    for r in (
        # No compatibility: serve the old system until the new gallery is complete, then cut over.
        Recipe(Method.INDEPENDENT, _NEW, query_strategy=Strategy.OLD, old_query_source=OldQuerySource.OLD_MODEL),
        Recipe(Method.BCT, BackboneLoss.BCT),
        Recipe(Method.RACT, BackboneLoss.RACT),
        Recipe(Method.FCT, _NEW, forward_transformation=True),
        Recipe(Method.FCT_SIDE_INFO, _NEW, forward_transformation=True, side_info=True),
        Recipe(Method.FASTFILL, _NEW, forward_transformation=True, uncertainty=True),
        Recipe(Method.FASTFILL_SIDE_INFO, _NEW, forward_transformation=True, side_info=True, uncertainty=True),
        Recipe(Method.RANK_MERGE, _NEW, query_strategy=Strategy.RANK_MERGE, old_query_source=OldQuerySource.OLD_MODEL),
        Recipe(
            Method.RANK_MERGE_PSI,
            _NEW,
            reverse_transformation=True,
            query_strategy=Strategy.RANK_MERGE,
            old_query_source=OldQuerySource.PSI,
        ),
    )
}


def get_recipe(method: Method | str) -> Recipe:
    """The recipe of ``method`` (a :class:`~raybackfill.types.Method` or its name)."""
    return RECIPES[parse(Method, method)]
