"""Architecture name -> builder, so a model.json (name + keyword arguments) rebuilds any model without code.

Only the builders listed here can be rebuilt from an artefact: a model.json can name an architecture, never
import or execute anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from raybackfill.models.backbones import resnet18, resnet50, small_cnn
from raybackfill.models.side_info import SideInfoModel
from raybackfill.models.transformations import (
    FastFillTransformation,
    ForwardTransformation,
    LinearForward,
    LinearReverse,
    ReverseTransformation,
)

BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": small_cnn,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "side_info_cnn": SideInfoModel,
    "forward_transformation": ForwardTransformation,
    "fastfill_transformation": FastFillTransformation,
    "reverse_transformation": ReverseTransformation,
    "linear_forward": LinearForward,
    "linear_reverse": LinearReverse,
}


def build_model(architecture: str, **kwargs: Any) -> nn.Module:
    """Build a registered architecture; unknown names and bad keyword arguments give a clear error."""
    if architecture not in BUILDERS:
        raise ValueError(f"unknown architecture {architecture!r}; valid: {', '.join(sorted(BUILDERS))}")
    try:
        return BUILDERS[architecture](**kwargs)
    except TypeError as err:
        raise ValueError(f"architecture {architecture!r}: bad arguments {kwargs} ({err})") from err
