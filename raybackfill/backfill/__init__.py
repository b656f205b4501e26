"""The backfill: which gallery items get re-embedded first (priority policies over stored old embeddings)."""
