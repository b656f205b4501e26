"""Per-batch row work that runs inside Ray Data tasks: decode the images of the rows still to do.

Kept apart from the orchestrator (raybackfill.backfill.run) on purpose: Ray sends a task's function by
reference, so a fresh worker imports the function's module, and run.py imports torch through the embedding
actors (~3 s of CPU per worker on this box). This module imports no torch; a worker that only filters or
decodes starts in ~1.5 s.
"""

from __future__ import annotations

import numpy as np

from raybackfill.backfill.sink import BAD_REASON
from raybackfill.data.images import decode_batch
from raybackfill.data.loading import keep_mask
from raybackfill.data.schema import ID, IMAGE

TIER = "tier"  # column carried from decode to the sink: the tier (ledger directory) of each row


def decode_kept(batch: dict[str, np.ndarray], keep: np.ndarray, tiers: np.ndarray, size: int
                ) -> dict[str, np.ndarray]:
    """Keep the rows still to do (``keep`` sorted, ``tiers`` the tier of each) and decode them, each with its
    tier; an undecodable row gets zero pixels and its reason."""
    mask = keep_mask(batch[ID], keep)
    ids, images = batch[ID][mask], batch[IMAGE][mask]
    decoded = decode_batch(images, size)
    pixels = decoded.pixels  # all decoded (the usual case): no copy
    if not decoded.ok.all():
        pixels = np.zeros((len(ids), 3, size, size), dtype=np.float32)
        pixels[decoded.ok] = decoded.pixels
    reasons = np.full(len(ids), "", dtype=object)
    reasons[~decoded.ok] = decoded.reasons
    return {ID: ids, TIER: tiers[np.searchsorted(keep, ids)], "pixels": pixels, BAD_REASON: reasons}
