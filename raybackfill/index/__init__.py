"""Serving during the backfill: a sharded FAISS index in Ray actors (old and new spaces per shard), a named
router that fans queries out and merges top-k, progress, snapshots. Pure parts (merge, sharding, validate,
progress math) import no Ray actor code, so this package file imports nothing."""
