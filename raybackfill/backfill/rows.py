"""Per-batch row work that runs inside Ray Data tasks: prepare the images or texts of the rows still to do.

Kept apart from the orchestrator (raybackfill.backfill.run) on purpose: Ray sends a task's function by
reference, so a fresh worker imports the function's module, and run.py imports torch through the embedding
actors, which costs every new worker seconds of CPU. This module imports no torch, so a worker that only
reads or decodes starts without that cost.
"""

from __future__ import annotations

import numpy as np

from raybackfill.data.loading import prepare_values
from raybackfill.data.preprocessing import Preprocessing
from raybackfill.data.schema import BAD_REASON

TIER = "tier"  # column carried from the read to the sink: the tier (ledger directory) of each row
POSITION = "position"  # column carried from the read to the sink: the row's position in its ledger track


def prepare_content(
    batch: dict[str, np.ndarray], content: str, preprocessing: dict[str, Preprocessing]
) -> dict[str, np.ndarray]:
    """Prepare the ``content`` column for the encoder (one column per preprocessing) and drop it; every other
    column (id, tier, position) passes through. A row that cannot be prepared keeps its place with its reason
    (the encoder skips it, the sink quarantines it), so the positions of a batch stay contiguous."""
    prepared, reasons = prepare_values(batch[content], preprocessing)
    passed = {name: values for name, values in batch.items() if name != content}
    return {**passed, BAD_REASON: reasons, **prepared}
