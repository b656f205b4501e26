"""The index router: a named, detached Ray actor in front of S shard actors.

Ids hash to shards (raybackfill.index.sharding); an upsert is split by shard, checked on every shard
(``dry_run``) and only then applied, so a bad id or a version mismatch refuses the whole batch instead
of applying part of it. A query goes to every shard at once (the query batch is put in the object store
once) and the per-shard top-k lists are merged by raybackfill.index.merge. An :class:`IndexSearcher` does
that fan-out and merge in the caller's process, without the hop through the router.

Strategies (chosen per query):
    old         old query vs every item's old vector: the pre-upgrade answer (until promote);
    compatible  one (new-model) query vs the new space plus the old vectors of items not moved yet
                (BCT/RACT: the new model is compatible with the old space; FCT/FastFill: everything is
                transformed first, so only the new space is searched);
    rank_merge  old query on the items not moved yet, new query on the moved ones, merged by score.

The router is an async actor: a search awaits its shards, so other calls proceed meanwhile, and the
light calls (``progress``, ``health``) run in their own concurrency group (their own event loop), so
they answer even while the default loop merges a large result. Shards and the router are detached and
named, so any process attaches with :func:`connect`, and a restarted router finds its shards by name.

Faults. A call that cannot reach every shard (one is dead or restarting) raises
:class:`IndexUnavailableError` instead of returning what the other shards said: an answer is complete
or it is an error, never silently partial. A restarted shard serves its last snapshot; the backfill
replays its ledger to bring it level again (raybackfill.backfill.ledger).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from raybackfill import NAMESPACE
from raybackfill.data.storage import exists, join, read_bytes, write_bytes
from raybackfill.index.aliases import get_alias
from raybackfill.index.merge import TopK, merge_results
from raybackfill.index.metrics import IndexMetrics
from raybackfill.index.progress import (
    Progress,
    RateTracker,
    eta_seconds,
    remaining_items,
)
from raybackfill.index.shard import TRAINABLE_SPACES, IndexConfig, IndexShard, ItemVectors, train_index
from raybackfill.index.sharding import split_by_shard
from raybackfill.index.validate import as_batch, as_ids, as_queries, as_vectors, check_k
from raybackfill.logs import configure_logging
from raybackfill.priority import check_nice, started_at_nice
from raybackfill.runtime import init_ray
from raybackfill.types import Phase, Space, Strategy, parse

logger = logging.getLogger(__name__)

DEFAULT_NAME = "raybackfill-router"
EXPORT_MANIFEST = "_export.json"  # written last by an export: its presence means the export is complete
ROUTER_STATE = "router.json"
# What the router and each shard ask of RouterConfig.node_resource: a sliver, so that only nodes started with
# that resource take them, without capping how many index actors fit on one such node.
NODE_RESOURCE_SHARE = 0.001


@dataclass(frozen=True)
class RouterConfig:
    """An index: its actor name, shard count and per-shard resources, index kind, snapshot location.
    The defaults fit a 2-CPU laptop; on a cluster give shards whole CPUs (FAISS threads follow them)."""

    name: str = DEFAULT_NAME
    shards: int = 2
    shard_num_cpus: float = 0.25
    shard_num_gpus: float = 0.0
    index: IndexConfig = field(default_factory=IndexConfig)
    snapshot_uri: str | None = None
    rate_window_s: float = 60.0
    # A custom resource (e.g. "index_node") that only the cluster's fixed, never-autoscaled nodes declare: the
    # router and the shards then run only there, never on a worker the autoscaler may remove. None: anywhere.
    node_resource: str | None = None
    # The nice value (Linux) the router and shard processes start at. Ray starts its workers at 15; queries are
    # the latency-critical work of the nodes that hold the index, so it runs at 0 like the raylet and a driver,
    # above a backfill's read tasks (15) and actors (lower still). 15 keeps Ray's default.
    serving_nice: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must be a non-empty actor name")
        if self.shards <= 0:
            raise ValueError(f"shards must be positive, got {self.shards}")
        if self.shard_num_cpus < 0 or self.shard_num_gpus < 0:
            raise ValueError("shard resources must be non-negative")
        if self.rate_window_s <= 0:
            raise ValueError(f"rate_window_s must be positive, got {self.rate_window_s}")
        if self.node_resource is not None and not self.node_resource:
            raise ValueError("node_resource must be a resource name or None")
        check_nice(
            self.serving_nice,
            "serving_nice",
            "the nice value the index's processes start at: not above the raylet's priority without privileges",
        )

    def actor_resources(self) -> dict[str, float]:
        """Custom resources of the router and of each shard: a sliver of ``node_resource``, if set."""
        return {self.node_resource: NODE_RESOURCE_SHARE} if self.node_resource else {}

    def actor_runtime_env(self) -> dict:
        """The runtime environment of the router and of each shard: Ray starts their processes at
        ``serving_nice``."""
        return started_at_nice(self.serving_nice)

    def shard_name(self, shard: int) -> str:
        return f"{self.name}-shard-{shard:03d}"

    def shard_snapshot_uri(self, shard: int) -> str | None:
        return join(self.snapshot_uri, f"shard-{shard:03d}") if self.snapshot_uri else None


class IndexUnavailableError(ConnectionError):
    """An index actor (a shard or the router) is dead or restarting, so the call did not reach all of the
    index: nothing partial was returned or applied for good. Retry once the actor is back. A ConnectionError
    (an OSError), so the CLI prints it as one error line."""


def _unavailable(err: RayActorError, what: str) -> IndexUnavailableError:
    return IndexUnavailableError(
        f"{what} unavailable (dead or restarting: {type(err).__name__}); no partial answer was returned, retry"
    )


def _cause(err: RayTaskError) -> Exception:
    """A remote ValueError is the user's mistake: re-raise it with its own message, not a traceback;
    an unavailable shard keeps its type, so callers can tell it from a failure and retry."""
    return err.cause if isinstance(err.cause, (ValueError, IndexUnavailableError)) else err


def get(refs, timeout: float | None = None, *, actor: str = "index router"):
    """``ray.get`` for index calls: a ValueError or IndexUnavailableError raised by the router or a shard
    comes back as itself; a dead or restarting ``actor`` (what the refs are calls of) is an
    IndexUnavailableError too."""
    try:
        return ray.get(refs, timeout=timeout)
    except RayTaskError as err:
        raise _cause(err) from None
    except RayActorError as err:
        raise _unavailable(err, actor) from None


async def _gather(refs: list) -> list:
    """Every shard's answer, or an error: a shard that died or is restarting fails the whole call."""
    try:
        return list(await asyncio.gather(*refs))
    except RayTaskError as err:
        raise _cause(err) from None
    except RayActorError as err:
        raise _unavailable(err, "an index shard") from None


@dataclass(frozen=True)
class SearchTargets:
    """What a search needs to reach an index without its router: the shards' handles and the index config
    (limits, metric, search parameters). A router gives it (``search_targets``) to an :class:`IndexSearcher`."""

    name: str
    index: IndexConfig
    shards: tuple


@dataclass(frozen=True)
class _SearchCall:
    """One search sent to every shard: their answers' refs, and how to merge them."""

    refs: list
    k: int
    strategy: Strategy


def _send_search(
    targets: SearchTargets, queries_old, queries_new, k: int, strategy: Strategy, params: dict | None
) -> _SearchCall:
    """Validate a search (k, parameters, batch sizes: refused here, before any shard) and send it to every shard.
    A batch goes inline to one shard and through the object store, once, to several."""
    strategy = parse(Strategy, strategy)
    k = check_k(k, targets.index.max_k)
    params = targets.index.query_params(params) if params else None
    limit = targets.index.max_queries
    shared = (lambda q: q) if len(targets.shards) == 1 else ray.put
    q_old = None if queries_old is None else shared(as_queries(queries_old, None, limit, "queries_old"))
    q_new = None if queries_new is None else shared(as_queries(queries_new, None, limit, "queries_new"))
    return _SearchCall([s.search.remote(q_old, q_new, k, strategy, params) for s in targets.shards], k, strategy)


class IndexSearcher:
    """Searches an index from the calling process: the router's fan-out and merge, one Ray call per shard
    instead of a call to the router that calls the shards (a hop that copies the queries and the answers once
    more). The answers are the router's: the same shards, the same merge.

    The router stays the index's control plane (writes, training, lifecycle, progress); it hands out the
    shards once. A shard that restarts keeps its handle; an index destroyed meanwhile makes every search an
    :class:`IndexUnavailableError` (connect again). Searches are counted in the index's query metrics, from
    this process.

    Args:
        targets: from the router's ``search_targets`` (or use :meth:`connect`).
        metrics: where searches are counted (the router passes its own); by default the index's query metrics,
            made in this process on the first search.

    Example:
        >>> searcher = IndexSearcher.connect("raybackfill-router")  # doctest: +SKIP
        >>> top = searcher.search(q_old, q_new, 10, Strategy.RANK_MERGE)  # doctest: +SKIP
    """

    def __init__(self, targets: SearchTargets, metrics: IndexMetrics | None = None) -> None:
        self.targets = targets
        self._metrics = metrics  # None: made on the first search, since metrics need a connected Ray

    @classmethod
    def connect(cls, name: str = DEFAULT_NAME) -> IndexSearcher:
        """A searcher of the index (or alias) ``name``, see :func:`connect`."""
        return cls(get(connect(name).search_targets.remote()))

    @property
    def name(self) -> str:
        return self.targets.name

    def search(
        self,
        queries_old,
        queries_new,
        k: int,
        strategy: Strategy,
        params: dict | None = None,
        timeout: float | None = None,
    ) -> TopK:
        """Top-k per query over every shard, merged; the arguments are the router's ``search``'s.

        Raises:
            ValueError: a bad query, k or parameter (the message names it).
            IndexUnavailableError: a shard is dead or restarting (no partial answer).
            ray.exceptions.GetTimeoutError: no complete answer within ``timeout`` seconds.
        """
        started = time.perf_counter()
        try:
            call = _send_search(self.targets, queries_old, queries_new, k, strategy, params)
            answers = get(call.refs, timeout, actor="an index shard")
        except Exception as err:
            # A search that timed out is left to finish, not cancelled: in Ray 2.60 a shard call cancelled while
            # queued leaves a gap in the shard's ordered task queue, and the shard then stalls for 30 s and fails
            # every call queued behind it. A search is bounded (max_queries, max_k), so its work is short.
            self._observed().count_error("search", err)
            raise
        return self._answer(call, answers, started)

    async def search_async(
        self, queries_old, queries_new, k: int, strategy: Strategy, params: dict | None = None
    ) -> TopK:
        """:meth:`search` for an event loop (a Serve replica, an async actor). Cancelled (e.g. by a timeout), it
        stops waiting; the shards' calls finish (see :meth:`search`)."""
        started = time.perf_counter()
        try:
            call = _send_search(self.targets, queries_old, queries_new, k, strategy, params)
            answers = await _gather(call.refs)
        except Exception as err:
            self._observed().count_error("search", err)
            raise
        return self._answer(call, answers, started)

    def _answer(self, call: _SearchCall, answers: list[TopK], started: float) -> TopK:
        """The shards' answers as one top-k, counted; a lone shard's answer is merged across its spaces already."""
        top = answers[0] if len(answers) == 1 else merge_results(answers, call.k, self.targets.index.metric)
        self._observed().observe_query(call.strategy, len(top.ids), time.perf_counter() - started)
        return top

    def _observed(self) -> IndexMetrics:
        if self._metrics is None:
            self._metrics = IndexMetrics(self.targets.name)
        return self._metrics


@ray.remote(concurrency_groups={"light": 2})  # type: ignore[call-overload]  # ray's overloads omit it
class IndexRouter:
    def __init__(self, config: RouterConfig) -> None:
        configure_logging()
        self._config = config
        self._shards = [
            IndexShard.options(  # type: ignore[attr-defined]  # an ActorClass: mypy ignores class decorators
                name=config.shard_name(i),
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                max_restarts=-1,
                num_cpus=config.shard_num_cpus,
                num_gpus=config.shard_num_gpus,
                resources=config.actor_resources(),
                runtime_env=config.actor_runtime_env(),
                # Across nodes, not packed on the first that fits: a shard's memory is its share of the gallery.
                scheduling_strategy="SPREAD",
            ).remote(config.index, config.shard_snapshot_uri(i))
            for i in range(config.shards)
        ]
        self._targets = SearchTargets(config.name, config.index, tuple(self._shards))
        self._metrics = IndexMetrics(config.name)
        self._searcher = IndexSearcher(self._targets, self._metrics)  # the router's searches are a searcher's
        # Small state shared by the default and the light event loops (two threads).
        self._lock = threading.Lock()
        self._shard_counts: list[dict[str, int]] = [dict.fromkeys(Space, 0) for _ in self._shards]
        # Bumped before and after a lifecycle call (train, promote, rollback) records the counts its shards
        # return. The light calls run on their own thread; a read of the shards' counts that overlapped one of
        # those calls may mix shards before and after it, and is not recorded over the call's own counts.
        self._count_epoch = 0
        self._tracker = RateTracker(config.rate_window_s)
        self._phase, self._started_at, self._last_error = Phase.IDLE, None, None
        self._state_uri = join(config.snapshot_uri, ROUTER_STATE) if config.snapshot_uri else None
        if self._state_uri and exists(self._state_uri):
            state = json.loads(read_bytes(self._state_uri))
            self._phase = parse(Phase, state["phase"])
            self._started_at, self._last_error = state["started_at"], state["last_error"]
            logger.info("router %s restarted in phase %s (state from %s)", config.name, self._phase, self._state_uri)

    # ----------------------------------------------------------------- light calls
    @ray.method(concurrency_group="light")
    async def health(self) -> dict:
        """Config, shard names, and each space's provenance (model version and dim) as the shards hold it."""
        shards = await _gather([s.describe.remote() for s in self._shards])
        spaces = {key: next((d[key] for d in shards if d[key]), None) for key in ("old_space", "new_space")}
        return {
            "name": self._config.name,
            "config": dataclasses.asdict(self._config),
            "shard_names": await self.shard_names(),  # type: ignore[operator]  # ray.method types the remote handle
            "shard_counts": [d["counts"] for d in shards],
            "promoted": any(d["promoted"] for d in shards),
            "generation": max(d["generation"] for d in shards),
            "retired": next((d["retired"] for d in shards if d["retired"]), None),
            **spaces,
        }

    @ray.method(concurrency_group="light")
    async def shard_names(self) -> list[str]:
        """The shards' actor names, without asking the shards (so it answers while one is dead)."""
        return [self._config.shard_name(i) for i in range(self._config.shards)]

    @ray.method(concurrency_group="light")
    async def progress(self) -> Progress:
        await self._refresh_counts()
        return self._progress()

    @ray.method(concurrency_group="light")
    async def set_phase(self, phase: Phase) -> Progress:
        """Set by the backfill ("instant", "backfill", "done", ...); restarts the rate measurement."""
        phase = parse(Phase, phase)
        await self._refresh_counts()
        self._enter_phase(phase)
        return self._progress()

    @ray.method(concurrency_group="light")
    async def report_error(self, message: str | None) -> None:
        """The backfill's last error (shown by `raybackfill status`); None clears it."""
        with self._lock:
            self._last_error = message
        self._save_state()

    # ----------------------------------------------------------------- data
    async def load_old(self, ids, vectors, version: str) -> dict[str, int]:
        """Add gallery items with their old-model vectors, split by shard; all-or-nothing validation."""
        return await self._apply("load_old", ids, vectors, version)

    async def upsert(self, ids, vectors, state: Space, version: str) -> dict[str, int]:
        """Move items to the new space ("transformed" or "new" vectors of model ``version``)."""
        return await self._apply("upsert", ids, vectors, state, version)

    async def _apply(self, method: str, ids, vectors, *args) -> dict[str, int]:
        started = time.perf_counter()
        try:
            ids, vectors = as_batch(ids, vectors)
            groups = split_by_shard(ids, len(self._shards))
            pieces = [(i, ray.put(ids[g]), ray.put(vectors[g])) for i, g in enumerate(groups) if len(g)]
            calls = [getattr(self._shards[i], method) for i, _, _ in pieces]
            await _gather(
                [
                    call.remote(p_ids, p_vec, *args, dry_run=True)
                    for call, (_, p_ids, p_vec) in zip(calls, pieces, strict=True)
                ]
            )
            await _gather(
                [call.remote(p_ids, p_vec, *args) for call, (_, p_ids, p_vec) in zip(calls, pieces, strict=True)]
            )
        except Exception as err:
            logger.warning("%s refused or failed: %s", method, err)
            self._metrics.count_error(method, err)
            with self._lock:
                self._last_error = f"{method}: {err}"
            raise
        state = parse(Space, args[0]) if method == "upsert" else Space.OLD
        self._metrics.observe_write(method, state, len(ids), time.perf_counter() - started)
        # Every shard's counts (light calls), so totals are right even for shards this batch missed.
        await self._refresh_counts()
        return self._progress().counts

    async def train(self, space: Space, vectors, version: str) -> None:
        """Train ``space`` (old or new) of every shard on one sample: one empty index of the configured factory
        is trained (in a Ray task that reserves no CPU, outside the shards, so serving goes on) and a copy is
        installed in every shard, so all shards share its codebooks. Call it before the first vectors of a space
        whose factory needs training (``IndexConfig.needs_training``); for other factories (Flat, HNSW) it does
        nothing.

        Args:
            space: Space.OLD (a sample of the old table) or Space.NEW (transformed or new vectors).
            vectors: (n, d) training sample (normalised here for the cosine metric).
            version: the model version of the space; a space holding vectors of another version refuses it,
                one holding vectors of this version keeps its training (a resumed backfill may train again).

        Example:
            >>> get(router.train.remote(Space.OLD, sample, "old-v1"))  # doctest: +SKIP
        """
        space = parse(Space, space, what="space", among=TRAINABLE_SPACES)
        if not isinstance(version, str) or not version:
            raise ValueError(f"version must be a non-empty model version tag, got {version!r}")
        config = self._config.index
        if not config.needs_training:
            logger.info("index %r needs no training: train(%s) does nothing", config.factory, space)
            return
        vectors = as_vectors(vectors, None, "training vectors")
        # The task reserves no CPU, so it never waits behind shards that hold every CPU of the cluster; it runs
        # as many FAISS threads as a shard has.
        task = _train_task.options(num_cpus=0)  # type: ignore[attr-defined]  # a RemoteFunction
        (blob,) = await _gather([task.remote(config, vectors, max(1, int(self._config.shard_num_cpus)))])
        blob_ref = ray.put(blob)
        await self._record_lifecycle("set_trained", space, blob_ref, version)
        logger.info("trained the %s space (%s) of %r on %d vectors", space, version, config.factory, len(vectors))

    async def search(self, queries_old, queries_new, k: int, strategy: Strategy, params: dict | None = None) -> TopK:
        """Top-k per query over every shard, merged and de-duplicated (see raybackfill.index.merge).
        ``params`` overrides the index's search parameters for this query (``{"nprobe": 32}``,
        ``{"efSearch": 128}``); a parameter the index kind does not take is refused by name."""
        return await self._searcher.search_async(queries_old, queries_new, k, strategy, params)

    @ray.method(concurrency_group="light")
    async def search_targets(self) -> SearchTargets:
        """The shards' handles and the index config, for an :class:`IndexSearcher` (searches without this hop)."""
        return self._targets

    async def vectors(self, ids) -> ItemVectors:
        """Stored vectors of some items, in the order asked (e.g. to query with an item)."""
        ids = as_ids(ids)
        if not len(ids):
            raise ValueError("vectors: no ids given")
        groups = split_by_shard(ids, len(self._shards))
        parts = await _gather([self._shards[i].vectors.remote(ids[g]) for i, g in enumerate(groups) if len(g)])
        order = np.concatenate([g for g in groups if len(g)])
        states = np.zeros(len(ids), dtype=np.int8)
        states[order] = np.concatenate([p.states for p in parts])
        lineages = []
        for attribute in ("old_lineage", "new_lineage"):
            in_order = np.full(len(ids), None, dtype=object)
            in_order[order] = [x for p in parts for x in (getattr(p, attribute) or [None] * len(p.ids))]
            lineages.append(in_order.tolist())
        return ItemVectors(
            ids,
            states,
            _scatter(order, [p.old for p in parts], len(ids)),
            _scatter(order, [p.new for p in parts], len(ids)),
            *lineages,
        )

    # ----------------------------------------------------------------- lifecycle
    async def promote(self, retain: bool = True) -> dict[str, int]:
        """Make the new space the serving generation on every shard; refused (on all shards) while any item is
        still old. The generation it replaces is kept for :meth:`rollback` until :meth:`gc` or the index's
        ``retention_s`` (``retain=False``: dropped now, its memory freed)."""
        counts = await _gather([s.counts.remote() for s in self._shards])
        waiting = sum(c[Space.OLD] for c in counts)
        if waiting:
            raise ValueError(f"cannot promote: {waiting} items are not in the new space yet")
        shards = await _gather([s.describe.remote() for s in self._shards])
        new_space = next((d["new_space"] for d in shards if d["new_space"]), None)
        if new_space is None:
            raise ValueError("cannot promote: there is no new space (no upgrade was started)")
        await self._record_lifecycle("promote", new_space, retain)
        self._enter_phase(Phase.PROMOTED)
        logger.info("index %s: generation %s promoted", self._config.name, new_space["version"])
        return self._progress().counts

    async def rollback(self) -> dict[str, int]:
        """Undo the last step of the lifecycle on every shard.

        While an upgrade is under way or done (any shard has a new space): every item back to the old space,
        the new space forgotten (phase ``rolled_back``). After a promote with no new upgrade begun: the
        generation the promote replaced comes back as it was, every item in the new space again (phase
        ``done``; promote again, or roll back once more to the older generation alone). Refused once that
        generation was collected (:meth:`gc`, retention) or when items were loaded after the promote."""
        shards = await _gather([s.describe.remote() for s in self._shards])
        upgrading = any(d["new_space"] or Space.NEW in d["trained"] for d in shards)
        undo_promote = not upgrading and any(d["generation"] > 1 for d in shards)
        if undo_promote:
            missing = [i for i, d in enumerate(shards) if d["retired"] is None and sum(d["counts"].values())]
            if missing:
                raise ValueError(
                    "cannot roll back the promote: the generation it replaced is gone (collected by gc or its "
                    f"retention, or never kept) on shards {missing}"
                )
        await self._record_lifecycle("rollback", undo_promote)
        self._enter_phase(Phase.DONE if undo_promote else Phase.ROLLED_BACK)
        return self._progress().counts

    async def gc(self) -> dict:
        """Drop the generation the last promote replaced, on every shard (its memory is freed; the promote can
        no longer be rolled back). Returns what was collected ({} when there was nothing)."""
        collected = await _gather([s.gc.remote() for s in self._shards])
        found = [c for c in collected if c]
        if not found:
            return {}
        return {**found[0], "items": sum(c["items"] for c in found)}

    async def provenance(self) -> dict:
        """Which models made the served vectors, summed over the shards: the generation, the serving space's
        items per lineage ("v2", "v1>v2", ...), the new space's items per lineage and state, the retired one.
        See :meth:`IndexShard.provenance`."""
        parts = await _gather([s.provenance.remote() for s in self._shards])
        merged: dict = {"generation": max(p["generation"] for p in parts)}
        for key in ("old", "new"):
            held = [p[key] for p in parts if p[key] is not None]
            merged[key] = (
                {"version": held[0]["version"], "lineages": _summed([h["lineages"] for h in held])} if held else None
            )
        retired = [p["retired"] for p in parts if p["retired"] is not None]
        merged["retired"] = {**retired[0], "items": sum(r["items"] for r in retired)} if retired else None
        return merged

    async def export(self, uri: str, space: Space, part_rows: int = 100_000) -> dict:
        """Write one space's vectors as an embedding table under ``uri``: every shard writes its own Parquet
        parts (``shard-000-00000.parquet``, ...; columns id, embedding, model, generation, lineage), then a
        manifest ``_export.json`` is written last. The table loads with ``raybackfill serve --old-embeddings``
        and feeds the next upgrade as its old embeddings.

        Args:
            uri: a new directory (local or s3://).
            space: Space.OLD (the serving generation: every item) or Space.NEW (the items moved so far).
            part_rows: items per Parquet part.

        Returns:
            The manifest: generation version, dim, metric, items, lineages, files.
        """
        space = parse(Space, space, what="space", among=TRAINABLE_SPACES)
        if exists(join(uri, EXPORT_MANIFEST)):
            raise ValueError(f"{uri} already holds an export; choose a new directory")
        parts = await _gather(
            [s.export.remote(uri, f"shard-{i:03d}", space, part_rows) for i, s in enumerate(self._shards)]
        )
        versions = {p["version"] for p in parts if p["version"] is not None}
        if not versions:
            raise ValueError(f"nothing to export: the index has no {space} space")
        lineages: dict[str, int] = {}
        for part in parts:
            for lineage, n in part["lineages"].items():
                lineages[lineage] = lineages.get(lineage, 0) + n
        manifest = {
            "index": self._config.name,
            "space": space.value,
            "generation": versions.pop(),
            "dim": next(p["dim"] for p in parts if p["dim"] is not None),
            "metric": self._config.index.metric.value,
            "factory": self._config.index.factory,
            "items": sum(p["items"] for p in parts),
            "lineages": lineages,
            "files": [f for p in parts for f in p["files"]],
            "written_at": time.time(),
        }
        write_bytes(join(uri, EXPORT_MANIFEST), json.dumps(manifest, indent=1).encode())
        logger.info("exported %d items of %s to %s", manifest["items"], manifest["generation"], uri)
        return manifest

    async def snapshot(self) -> list[str]:
        """Snapshot every shard (concurrently); each shard restores its own on restart."""
        if not self._config.snapshot_uri:
            raise ValueError("this index has no snapshot_uri; create it with one to take snapshots")
        uris = await _gather([s.snapshot.remote() for s in self._shards])
        self._save_state()
        return uris

    # ----------------------------------------------------------------- helpers
    def _enter_phase(self, phase: Phase) -> None:
        if phase != self._phase:
            logger.info("index %s: phase %s -> %s", self._config.name, self._phase, phase)
        with self._lock:
            self._phase = phase
            if phase in (Phase.INSTANT, Phase.BACKFILL) and self._started_at is None:
                self._started_at = time.time()
            if phase in (Phase.PROMOTED, Phase.ROLLED_BACK):
                self._started_at = None  # the next upgrade starts its own clock
            self._tracker.reset(time.time(), self._done())
        self._save_state()

    def _epoch(self) -> int:
        with self._lock:
            return self._count_epoch

    def _bump_epoch(self) -> None:
        with self._lock:
            self._count_epoch += 1

    async def _refresh_counts(self) -> None:
        """Read every shard's counts (light calls) and record them, unless a lifecycle call overlapped the read."""
        epoch = self._epoch()
        self._record_counts(await _gather([s.counts.remote() for s in self._shards]), read_at=epoch)

    async def _record_lifecycle(self, method: str, *args) -> None:
        """Call the lifecycle ``method`` (train, promote, rollback: each returns its shard's counts) on every shard
        and record those counts; the epoch is bumped before the calls go out and after they are recorded, so a
        plain read that overlapped them is not recorded over them."""
        self._bump_epoch()
        self._record_counts(await _gather([getattr(s, method).remote(*args) for s in self._shards]))
        self._bump_epoch()

    def _record_counts(self, counts: list[dict[str, int]], read_at: int | None = None) -> None:
        """Record the shards' counts; a read begun at epoch ``read_at`` is dropped if a lifecycle call began or
        ended since (its counts may predate that call's)."""
        with self._lock:
            if read_at is not None and read_at != self._count_epoch:
                return
            self._shard_counts = list(counts)
            self._tracker.observe(time.time(), self._done())

    def _totals(self) -> dict[str, int]:
        return {s: sum(c[s] for c in self._shard_counts) for s in Space}

    def _done(self) -> int:
        totals = self._totals()
        return sum(totals.values()) - remaining_items(totals, self._phase)

    def _progress(self) -> Progress:
        with self._lock:
            now = time.time()
            totals = self._totals()
            remaining = remaining_items(totals, self._phase)
            rate = self._tracker.rate(now)
            progress = Progress(
                name=self._config.name,
                phase=self._phase,
                counts=totals,
                per_shard=[dict(c) for c in self._shard_counts],
                total=sum(totals.values()),
                remaining=remaining,
                rate=rate,
                eta_seconds=eta_seconds(remaining, rate),
                started_at=self._started_at,
                updated_at=now,
                last_error=self._last_error,
            )
        self._metrics.export_progress(progress)
        return progress

    def _save_state(self) -> None:
        if self._state_uri:
            with self._lock:
                state = {"phase": self._phase, "started_at": self._started_at, "last_error": self._last_error}
            write_bytes(self._state_uri, json.dumps(state).encode())


@ray.remote
def _train_task(config: IndexConfig, vectors: np.ndarray, threads: int) -> bytes:
    """Train one empty index of the configured factory (a task: the router actor itself takes no CPU)."""
    import faiss

    faiss.omp_set_num_threads(threads)
    return train_index(config, vectors)


def _summed(counts: list[dict]) -> dict:
    """Nested count dicts ({lineage: n} or {lineage: {state: n}}) added key by key."""
    total: dict = {}
    for part in counts:
        for key, value in part.items():
            if isinstance(value, dict):
                total[key] = _summed([total.get(key, {}), value])
            else:
                total[key] = total.get(key, 0) + value
    return total


def _scatter(order: np.ndarray, parts: list[np.ndarray | None], n: int) -> np.ndarray | None:
    """Reassemble per-shard rows in request order; rows of shards without that space stay zero."""
    dims = {p.shape[1] for p in parts if p is not None}
    if not dims:
        return None
    out = np.zeros((n, dims.pop()), dtype=np.float32)
    start = 0
    for part, size in zip(parts, [len(p) if p is not None else 0 for p in parts], strict=True):
        if part is not None:
            out[order[start : start + size]] = part
        start += size
    return out


# --------------------------------------------------------------------- attach / create / destroy
def _attach() -> None:
    """Attach to a running cluster: "auto" honours RAY_ADDRESS, else finds the one started on this machine.
    Never starts a throwaway local cluster: the index actors must outlive this process."""
    init_ray("auto")


def connect(name: str = DEFAULT_NAME):
    """The router actor named ``name``, or of the index the alias ``name`` points to, from any process attached to
    (or able to reach) the cluster. An index name wins over an alias (``alias set`` refuses such an alias).

    The handle stays on the index it was resolved to: to follow ``raybackfill alias set``, call ``connect`` again
    (an alias costs one GCS read more than an index name).

    Args:
        name: the index name given to :func:`create_index` (``raybackfill serve --name``), or an alias
            (``raybackfill alias set NAME INDEX``).

    Returns:
        The router's actor handle: ``search``, ``progress``, ``upsert``, ``promote``, ... are remote methods.

    Example:
        >>> router = connect()  # doctest: +SKIP
        >>> top = ray.get(router.search.remote(q_old, q_new, 10, Strategy.RANK_MERGE))  # doctest: +SKIP
    """
    _attach()
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError as err:
        missing = err
    alias = get_alias(name)
    if alias is None:
        raise ValueError(
            f"no index named {name!r} in Ray namespace {NAMESPACE!r}, nor an alias of that name; start one with "
            "`raybackfill serve`"
        ) from missing
    try:
        return ray.get_actor(alias.index, namespace=NAMESPACE)
    except ValueError as err:
        raise ValueError(
            f"alias {name!r} points to index {alias.index!r}, which does not run (stopped, or not started); point "
            f"it at a running index with `raybackfill alias set {name} INDEX`"
        ) from err


def create_index(config: RouterConfig | None = None):
    """Create (or attach to, if it already runs with the same config) the router and its shards.

    The actors are detached and restart on failure (each shard from its last snapshot when the config has a
    ``snapshot_uri``), so the index outlives the process that created it.

    Args:
        config: name, shards, their resources, the FAISS index kind and the snapshot location.

    Returns:
        The router's actor handle.

    Example:
        >>> router = create_index(RouterConfig(shards=4, snapshot_uri="s3://bucket/index"))  # doctest: +SKIP
    """
    config = config or RouterConfig()
    _attach()
    router = IndexRouter.options(  # type: ignore[attr-defined]  # an ActorClass: mypy ignores class decorators
        name=config.name,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        num_cpus=0,
        resources=config.actor_resources(),
        runtime_env=config.actor_runtime_env(),
    ).remote(config)
    running = get(router.health.remote())["config"]
    if running != dataclasses.asdict(config):
        raise ValueError(
            f"an index named {config.name!r} already runs with another configuration "
            f"({running}); connect to it, or destroy it first"
        )
    return router


def destroy_index(name: str = DEFAULT_NAME) -> list[str]:
    """Kill the router and its shards for good (no restart); their snapshots are kept.

    Args:
        name: the index name (an alias is refused: stopping an index is never done through a name that may be
            switched to another index meanwhile).

    Returns:
        The names of the killed actors.

    Example:
        >>> destroy_index("raybackfill-router")  # doctest: +SKIP
    """
    _attach()
    try:
        router = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError as err:
        alias = get_alias(name)
        if alias is not None:
            raise ValueError(
                f"{name!r} is an alias (of index {alias.index!r}), not an index: stop the index by its own name"
            ) from err
        raise ValueError(f"no index named {name!r} in Ray namespace {NAMESPACE!r}") from err
    shard_names = get(router.shard_names.remote())
    for shard in shard_names:
        try:
            ray.kill(ray.get_actor(shard, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            continue  # already gone
    ray.kill(router, no_restart=True)
    return [*shard_names, name]
