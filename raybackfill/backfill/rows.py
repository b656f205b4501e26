"""Per-batch row work that runs inside Ray Data tasks: prepare the images or texts of the rows still to do.

Kept apart from the orchestrator (raybackfill.backfill.run) on purpose: Ray sends a task's function by
reference, so a fresh worker imports the function's module, and run.py imports torch through the embedding
actors, which costs every new worker seconds of CPU. This module imports no torch, so a worker that only
filters or decodes starts without that cost.
"""

from __future__ import annotations

import numpy as np

from raybackfill.data.loading import prepare_values
from raybackfill.data.preprocessing import Preprocessing
from raybackfill.data.schema import BAD_REASON, ID
from raybackfill.types import locate_sorted

TIER = "tier"  # column carried from decode to the sink: the tier (ledger directory) of each row


def prepare_kept(
    batch: dict[str, np.ndarray],
    keep: np.ndarray,
    tiers: np.ndarray,
    content: str,
    preprocessing: dict[str, Preprocessing],
) -> dict[str, np.ndarray]:
    """Keep the rows still to do (``keep`` sorted, ``tiers`` the tier of each) and prepare their ``content``
    column for the encoder, each with its tier; a row that cannot be prepared keeps its place with its reason
    (the encoder skips it, the sink quarantines it)."""
    where = locate_sorted(keep, batch[ID], missing="mask")
    mask = where >= 0
    prepared, reasons = prepare_values(batch[content][mask], preprocessing)
    return {ID: batch[ID][mask], TIER: tiers[where[mask]], BAD_REASON: reasons, **prepared}
