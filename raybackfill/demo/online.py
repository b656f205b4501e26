"""The demo's online phase: serve the old gallery from a live index, run the FastFill backfill in
uncertainty order into it, and meanwhile let a query client measure the live quality, so the report shows
what a user of the service would have seen during the upgrade (and whether any query failed).

The backfill is paced (``OnlineConfig.min_seconds``): on the demo's small galleries an unpaced backfill is
over in a few seconds, before the client has taken enough readings to show how quality rose with it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from raybackfill.backfill.run import BackfillConfig, run_backfill
from raybackfill.compat.recipes import get_recipe
from raybackfill.data import storage
from raybackfill.data.schema import EMBEDDING, ID, LABEL, vectors_of
from raybackfill.demo.configs import OnlineConfig
from raybackfill.demo.pipeline import DemoArtifacts
from raybackfill.embed.pipeline import PoolConfig
from raybackfill.eval.live import LabelLookup, ProbeSet, live_quality
from raybackfill.index.router import RouterConfig, create_index, destroy_index, get
from raybackfill.types import Space, Strategy, locate_ids

logger = logging.getLogger(__name__)

INDEX_NAME = "raybackfill-demo"
LOAD_CHUNK = 10_000


def run_online(artifacts: DemoArtifacts, config: OnlineConfig | None = None, service=None) -> dict:
    """Returns the report's ``online`` section (items, seconds, items_per_s, queries, query_errors, ...).

    ``service``: a :class:`~raybackfill.service.client.ServiceClient` of an HTTP search service in front of the
    demo's index (``raybackfill serve --http --name raybackfill-demo``); the live queries then go through HTTP,
    so the live quality is what its clients see. Without it they call the router directly.
    """
    config = config or OnlineConfig()
    layout = artifacts.layout
    table = storage.read_table(artifacts.embeddings)
    query_ids = storage.read_table(artifacts.splits["query"], columns=[ID]).column(ID).to_numpy()
    rows = locate_ids(table.column(ID).to_numpy(), query_ids)
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
        gallery = storage.read_table(artifacts.gallery_old, columns=[ID, EMBEDDING])
        vectors = vectors_of(gallery)
        for start in range(0, gallery.num_rows, LOAD_CHUNK):
            stop = start + LOAD_CHUNK
            get(router.load_old.remote(gallery.column(ID).to_numpy()[start:stop], vectors[start:stop], Space.OLD))
        queries = router
        if service is not None:
            service.wait_ready()  # a service that held a handle to an earlier demo index finds the new one
            queries = service
        before = live_quality(queries, probes, lookup, strategy=Strategy.OLD, k=config.k, max_probes=config.max_probes)
        # Every gallery item passes once per phase: transformed (methods with a forward transformation), re-embedded.
        forward = get_recipe(config.method).forward_transformation
        max_rate = (2 if forward else 1) * gallery.num_rows / config.min_seconds if config.min_seconds else None
        client = _QueryClient(router, probes, lookup, config, queries)
        client.start()
        started = time.perf_counter()
        try:
            summary = run_backfill(
                BackfillConfig(
                    gallery=artifacts.splits["gallery"],
                    old_embeddings=artifacts.gallery_old,
                    upgrade=artifacts.models["new"],
                    out=layout.path("backfill"),
                    method=config.method,
                    transformation=artifacts.models[config.method] if forward else None,
                    old_model=artifacts.models["old"],
                    policy=config.policy,
                    tiers=config.tiers,
                    index=INDEX_NAME,
                    pool=PoolConfig(batch_size=config.batch_size),
                    transform_batch_size=config.batch_size,
                    max_rate=max_rate,
                    progress=False,
                )
            )
        finally:
            seconds = time.perf_counter() - started
            client.stop()
        after = live_quality(
            queries, probes, lookup, strategy=config.strategy, k=config.k, max_probes=config.max_probes
        )
    finally:
        destroy_index(INDEX_NAME)
    items = sum(phase.items for phase in summary.phases if phase.name != "plan")
    logger.info(
        "  backfill under queries: %d items in %.1fs, %d live queries, %d errors; live top-1 %.3f -> %.3f",
        items, seconds, client.queries, client.errors, before.top1, after.top1,
    )  # fmt: skip
    return {
        "items": items,
        "seconds": seconds,
        "items_per_s": items / seconds if seconds > 0 else 0.0,
        "max_rate": max_rate,
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
        "queried_through": "http" if service is not None else "router",
    }


class _QueryClient:
    """A thread that queries the live index like a user would, counting queries, errors and quality."""

    def __init__(self, router, probes: ProbeSet, lookup: LabelLookup, config: OnlineConfig, queries=None) -> None:
        self.router, self.probes, self.lookup, self.config = router, probes, lookup, config
        self.queries_to = router if queries is None else queries  # the router, or the HTTP service's client
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
                    self.queries_to, self.probes, self.lookup, strategy=self.config.strategy,
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
                        "fraction_transformed": _share(progress, Space.TRANSFORMED),
                        "fraction_new": progress.fraction_new,
                        "top1": reading.top1,
                        "map_at_k": reading.map_at_k,
                    }
                )
            self._stop.wait(self.config.pause_s)


def _share(progress, space: Space) -> float:
    """Share of the gallery an index's progress counts in ``space``."""
    return progress.counts.get(space, 0) / progress.total if progress.total else 0.0
