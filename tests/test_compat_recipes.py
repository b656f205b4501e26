"""Per-method recipes: what each method trains and how it queries during the backfill."""

from __future__ import annotations

import pytest

from raybackfill.compat.recipes import RECIPES, Recipe, get_recipe
from raybackfill.types import Method

METHODS = [
    "independent",
    "bct",
    "ract",
    "fct",
    "fct_side_info",
    "fastfill",
    "fastfill_side_info",
    "rank_merge",
    "rank_merge_psi",
]


def test_every_method_has_a_recipe():
    assert list(RECIPES) == METHODS == list(Method)
    assert all(get_recipe(name).name == name for name in METHODS)


@pytest.mark.parametrize(
    ("name", "loss", "transformation", "side", "uncertainty", "reverse", "strategy", "old_query"),
    [
        ("independent", "classification", False, False, False, False, "old", "old_model"),
        ("bct", "bct", False, False, False, False, "compatible", None),
        ("ract", "ract", False, False, False, False, "compatible", None),
        ("fct", "classification", True, False, False, False, "compatible", None),
        ("fct_side_info", "classification", True, True, False, False, "compatible", None),
        ("fastfill", "classification", True, False, True, False, "compatible", None),
        ("fastfill_side_info", "classification", True, True, True, False, "compatible", None),
        ("rank_merge", "classification", False, False, False, False, "rank_merge", "old_model"),
        ("rank_merge_psi", "classification", False, False, False, True, "rank_merge", "psi"),
    ],
)
def test_recipe_table(name, loss, transformation, side, uncertainty, reverse, strategy, old_query):
    recipe = get_recipe(name)
    assert (recipe.backbone_loss, recipe.forward_transformation, recipe.side_info, recipe.uncertainty) == (
        loss,
        transformation,
        side,
        uncertainty,
    )
    assert (recipe.reverse_transformation, recipe.query_strategy, recipe.old_query_source) == (
        reverse,
        strategy,
        old_query,
    )


def test_unknown_method_error_lists_valid_methods():
    with pytest.raises(ValueError, match="unknown method 'fastfil'; valid: independent, bct, .*rank_merge_psi"):
        get_recipe("fastfil")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backbone_loss": "mse"}, "backbone_loss"),
        ({"query_strategy": "vote"}, "query_strategy"),
        ({"query_strategy": "rank_merge"}, "old_query_source is needed"),
        ({"old_query_source": "old_model"}, "old_query_source is needed"),
        ({"query_strategy": "rank_merge", "old_query_source": "psi"}, "psi is trained"),
        ({"side_info": True}, "belong to a forward transformation"),
        ({"name": "magic"}, "unknown method 'magic'"),
        ({"query_strategy": "old", "old_query_source": "cache"}, "fct: unknown old_query_source 'cache'"),
    ],
)
def test_inconsistent_recipes_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Recipe(**{"name": "fct", "backbone_loss": "classification", **kwargs})


def test_recipes_are_frozen():
    with pytest.raises(AttributeError):
        get_recipe("bct").backbone_loss = "ract"  # type: ignore[misc]
