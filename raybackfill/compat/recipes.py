"""What each compatible-upgrade method trains and how it serves queries during the backfill.

Training jobs, the backfill orchestrator and the query router all read the same :class:`Recipe`, so a
method is described in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKBONE_LOSSES = ("classification", "bct", "ract")
QUERY_STRATEGIES = ("compatible", "rank_merge", "old")
OLD_QUERY_SOURCES = ("old_model", "psi")


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

    name: str
    backbone_loss: str
    forward_transformation: bool = False
    side_info: bool = False
    uncertainty: bool = False
    reverse_transformation: bool = False
    query_strategy: str = "compatible"
    old_query_source: str | None = None

    def __post_init__(self) -> None:
        if self.backbone_loss not in BACKBONE_LOSSES:
            raise ValueError(f"{self.name}: backbone_loss must be one of {BACKBONE_LOSSES}, got {self.backbone_loss!r}")
        if self.query_strategy not in QUERY_STRATEGIES:
            raise ValueError(f"{self.name}: query_strategy must be one of {QUERY_STRATEGIES}")
        needs_old_query = self.query_strategy in ("rank_merge", "old")
        if needs_old_query != (self.old_query_source is not None):
            raise ValueError(f"{self.name}: old_query_source is needed exactly for rank_merge and old strategies")
        if self.old_query_source is not None and self.old_query_source not in OLD_QUERY_SOURCES:
            raise ValueError(f"{self.name}: old_query_source must be one of {OLD_QUERY_SOURCES}")
        if (self.old_query_source == "psi") != self.reverse_transformation:
            raise ValueError(f"{self.name}: the old query comes from psi exactly when psi is trained")
        if (self.side_info or self.uncertainty) and not self.forward_transformation:
            raise ValueError(f"{self.name}: side_info and uncertainty belong to a forward transformation")


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        # No compatibility: serve the old system until the new gallery is complete, then cut over.
        Recipe("independent", "classification", query_strategy="old", old_query_source="old_model"),
        Recipe("bct", "bct"),
        Recipe("ract", "ract"),
        Recipe("fct", "classification", forward_transformation=True),
        Recipe("fct_side_info", "classification", forward_transformation=True, side_info=True),
        Recipe("fastfill", "classification", forward_transformation=True, uncertainty=True),
        Recipe("fastfill_side_info", "classification", forward_transformation=True, side_info=True, uncertainty=True),
        Recipe("rank_merge", "classification", query_strategy="rank_merge", old_query_source="old_model"),
        Recipe(
            "rank_merge_psi",
            "classification",
            reverse_transformation=True,
            query_strategy="rank_merge",
            old_query_source="psi",
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(RECIPES)}")
    return RECIPES[name]
