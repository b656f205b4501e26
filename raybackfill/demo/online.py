"""The demo's online phase: serve the old gallery from a live index, run the FastFill backfill in
uncertainty order into it, and meanwhile let a query client measure the live quality, so the report shows
what a user of the service would have seen during the upgrade (and whether any query failed)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from raybackfill.backfill.run import BackfillConfig, run_backfill
from raybackfill.data import storage as io
from raybackfill.data.schema import EMBEDDING, ID, LABEL, vectors_of
from raybackfill.demo.pipeline import DemoArtifacts
from raybackfill.embed.pipeline import PoolConfig
from raybackfill.eval.live import LabelLookup, ProbeSet, live_quality
from raybackfill.index.router import RouterConfig, create_index, destroy_index, get

INDEX_NAME = "raybackfill-demo"
LOAD_CHUNK = 10_000


@dataclass(frozen=True)
class OnlineConfig:
    method: str = "fastfill"
    policy: str = "uncertainty"
    # How the client queries: with both query embeddings, rank_merge serves old/old while every item is
    # still old, the transformed/new vectors once moved, and a merge of the two parts in between (a
    # `compatible` query would score new-model queries against old vectors before the instant phase).
    strategy: str = "rank_merge"
    shards: int = 2
    k: int = 10
    max_probes: int = 200
    pause_s: float = 0.2  # between two probe batches, so the client does not starve the backfill
    tiers: int = 4


def run_online(artifacts: DemoArtifacts, config: OnlineConfig | None = None, log: Callable[[str], None] = print):
    """Returns the report's ``online`` section (items, seconds, items_per_s, queries, query_errors, ...)."""
    config = config or OnlineConfig()
    layout = artifacts.layout
    table = io.read_table(artifacts.embeddings)
    ids = table.column(ID).to_numpy()
    query_ids = io.read_table(artifacts.splits["query"], columns=[ID]).column(ID).to_numpy()
    order = np.argsort(ids)
    rows = order[np.searchsorted(ids, query_ids, sorter=order)]
    probes = ProbeSet(
        labels=table.column(LABEL).to_numpy()[rows],
        old=vectors_of(table, EMBEDDING)[rows],
        new=vectors_of(table, "new")[rows],
    )
    lookup = LabelLookup.read(artifacts.gallery_old)

    with contextlib.suppress(ValueError):
        destroy_index(INDEX_NAME)  # left over from an interrupted demo
    router = create_index(RouterConfig(name=INDEX_NAME, shards=config.shards))
    try:
        gallery = io.read_table(artifacts.gallery_old, columns=[ID, EMBEDDING])
        vectors = vectors_of(gallery)
        for start in range(0, gallery.num_rows, LOAD_CHUNK):
            stop = start + LOAD_CHUNK
            get(router.load_old.remote(gallery.column(ID).to_numpy()[start:stop], vectors[start:stop], "old"))
        before = live_quality(router, probes, lookup, strategy="old", k=config.k, max_probes=config.max_probes)
        client = _QueryClient(router, probes, lookup, config)
        client.start()
        start = time.perf_counter()
        try:
            summary = run_backfill(
                BackfillConfig(
                    gallery=artifacts.splits["gallery"],
                    old_embeddings=artifacts.gallery_old,
                    upgrade=artifacts.models["new"],
                    out=layout.path("backfill"),
                    method=config.method,
                    transformation=artifacts.models[config.method],
                    policy=config.policy,
                    tiers=config.tiers,
                    index=INDEX_NAME,
                    pool=PoolConfig(batch_size=256),
                    progress=False,
                )
            )
        finally:
            seconds = time.perf_counter() - start
            client.stop()
        after = live_quality(router, probes, lookup, strategy=config.strategy, k=config.k, max_probes=config.max_probes)
    finally:
        destroy_index(INDEX_NAME)
    items = sum(phase.items for phase in summary.phases if phase.name != "plan")
    log(
        f"online: {items} items in {seconds:.1f}s, {client.queries} live queries, {client.errors} errors; "
        f"live top-1 {before.top1:.3f} (old) -> {after.top1:.3f} (after the backfill)"
    )
    return {
        "items": items,
        "seconds": seconds,
        "items_per_s": items / seconds if seconds > 0 else 0.0,
        "queries": client.queries,
        "query_errors": client.errors,
        "method": config.method,
        "policy": config.policy,
        "phases": [{"name": p.name, "items": p.items, "seconds": p.seconds, "rate": p.rate} for p in summary.phases],
        "quarantined": summary.quarantined,
        "live_top1_before": before.top1,
        "live_top1_after": after.top1,
        "live_map_at_k_before": before.map_at_k,
        "live_map_at_k_after": after.map_at_k,
        "live_readings": client.readings,
        "k": config.k,
    }


class _QueryClient:
    """A thread that queries the live index like a user would, counting queries, errors and quality."""

    def __init__(self, router, probes: ProbeSet, lookup: LabelLookup, config: OnlineConfig) -> None:
        self.router, self.probes, self.lookup, self.config = router, probes, lookup, config
        self.queries = self.errors = 0
        self.readings: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-query-client", daemon=True)
        self._start = time.perf_counter()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reading = live_quality(
                    self.router, self.probes, self.lookup, strategy=self.config.strategy,
                    k=self.config.k, max_probes=self.config.max_probes,
                )  # fmt: skip
                progress = get(self.router.progress.remote())
            except Exception:  # noqa: BLE001 - every failed query is counted, none may stop the client
                self.errors += 1
            else:
                self.queries += reading.probes
                self.readings.append(
                    {
                        "t": round(time.perf_counter() - self._start, 3),
                        "phase": progress.phase,
                        "fraction_new": progress.fraction_new,
                        "top1": reading.top1,
                        "map_at_k": reading.map_at_k,
                    }
                )
            self._stop.wait(self.config.pause_s)
