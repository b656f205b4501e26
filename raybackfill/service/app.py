"""The search service: a Ray Serve application (FastAPI ingress) in front of the index router.

Routes:
    POST /search    JSON (``image`` base64, ``text``, ``vector`` or ``vectors``; ``k``, ``strategy``, ``params``)
                    or multipart/form-data (an ``image`` file; ``k``, ``strategy``, ``params`` as form fields)
    GET  /status    the backfill's progress (what `raybackfill status` shows) and what the service serves
    GET  /healthz   200 while the router and every shard answer, else 503 with Retry-After
    GET  /openapi.json, /docs   the schema (FastAPI)

Requests are batched (``@serve.batch``): raw queries of one batch go through each encoder in one forward pass,
and the queries of a batch that share a strategy, k and parameters reach the index in one search: the replica
calls the shards itself (an :class:`~raybackfill.index.router.IndexSearcher` from the router, kept per index), one
Ray hop less than a search through the router.
The phase and the spaces' model versions are cached for ``status_ttl_s`` (one router round trip per second,
not one per request).

Aliases (blue/green, raybackfill.index.aliases). ``index`` may name an alias: the replica resolves it to an index
and reuses that resolution for ``alias_ttl_s`` (default 1 s; 0 reads it on every request). Why a TTL: a read is
a GCS round trip, small next to a search but a load on the cluster's one GCS that would grow with every
replica's request rate (docs/operations.md has the measured costs). The bound: a request that
reaches a replica more than ``alias_ttl_s`` after `raybackfill alias set` returned goes to the new target. A
request is pinned to the index it resolved to: its status (phase, versions, the encoder check), its search and
the versions of its hits all come from that one index, and a batch groups requests by index, so no answer mixes
two indexes. After a switch the encoder check runs against the new index: encoders that do not match it are
refused (409), never answered from the wrong space.

Errors are typed (:class:`~raybackfill.service.api.ServiceError`): a bad request is a 400 naming its field, a
missing or wrong API key a 401, a body over the limit a 413, a shard or router outage a 503 with
``Retry-After`` (a search never returns a partial answer, so neither does the service). Messages pass through
:func:`~raybackfill.service.api.redact`: no model path, URI or credential reaches a client.

Metrics go through ``ray.util.metrics`` to Ray's Prometheus export (the metrics port of each node, scraped as
the Ray docs describe; there is no ``/metrics`` route), where Ray prefixes them with ``ray_``:
``ray_raybackfill_http_requests_total{route,status}``, ``ray_raybackfill_http_request_seconds{route}``
(histogram) and ``ray_raybackfill_http_errors_total{route,type}``, beside Serve's own ``ray_serve_*`` series.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at run time.

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.util.metrics import Counter, Histogram
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from raybackfill import NAMESPACE
from raybackfill.adapters.gate import check_adapter
from raybackfill.compat.recipes import get_recipe
from raybackfill.index.aliases import Resolved, resolve
from raybackfill.index.merge import EMPTY_ID, TopK
from raybackfill.index.router import IndexSearcher, IndexUnavailableError
from raybackfill.index.serving import serving_strategy
from raybackfill.logs import configure_logging
from raybackfill.priority import started_at_nice
from raybackfill.service.api import (
    API_KEY_HEADER,
    DEFAULT_K,
    ErrorResponse,
    SearchBody,
    SearchRequest,
    SearchResponse,
    ServiceError,
    bad_request,
    field_of,
    hits_json,
    parse_k,
    parse_params,
    parse_search,
    redact,
    resolve_vectors,
)
from raybackfill.service.config import ServiceConfig
from raybackfill.service.queries import EncoderMismatchError, MissingEncoderError, QueryEncoders
from raybackfill.types import AdapterDirection, Space, Strategy, parse

logger = logging.getLogger(__name__)

APP_NAME = "raybackfill"
DEPLOYMENT = "SearchService"
OPEN_PATHS = ("/healthz",)  # answered without an API key: load balancers probe it
LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]

api = FastAPI(
    title="raybackfill search",
    description="Top-k search over a gallery that is being upgraded to a new embedding model, without downtime.",
    version="1",
)


@dataclass
class _Job:
    """One request inside a batch: its queries as vectors per space, or as raw contents still to embed."""

    request: SearchRequest
    strategy: Strategy
    index: str  # the index this request resolved to: every part of its answer comes from it


@dataclass
class _Outcome:
    """What a batch gives back to one request: its top-k rows, or the error that request alone gets."""

    topk: TopK | None = None
    error: ServiceError | None = None


def resolve_device(device: str) -> str:
    """``auto``: CUDA when this replica was given a GPU and torch sees one, else the CPU."""
    if device != "auto":
        return device
    from raybackfill.embed.actors import actor_device

    return str(actor_device())


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(api)
class SearchService:
    """The Serve deployment: loads the query encoders (on the replica's GPU when it has one), finds the router."""

    def __init__(self, config: dict[str, Any]) -> None:
        configure_logging()
        self.config = ServiceConfig.from_args(config)
        self._secrets = self.config.secrets()
        self._key_digest = self.config.api_key_digest()
        self.device = resolve_device(self.config.device)
        # Torch would start one thread per core of the node; a replica owns num_cpus of them.
        torch.set_num_threads(max(1, round(self.config.num_cpus)))
        from raybackfill.encoders import EntrypointTrust

        trust = EntrypointTrust(self.config.trust_entrypoints, self.config.trust_all_entrypoints)
        has_encoder = self.config.old_model or self.config.new_model
        self.encoders = (
            QueryEncoders.load(
                old=self.config.old_model,
                new=self.config.new_model,
                psi=self.config.psi_model,
                trust=trust,
                device=self.device,
                image_size=self.config.image_size,
            )
            if has_encoder
            else None
        )
        self.during = self._mixed_strategy()
        # Per index (an alias's targets over time): router handles and cached status, dropped on a switch.
        self._routers: dict[str, Any] = {}
        self._searchers: dict[str, IndexSearcher] = {}  # searches reach the shards without the router's hop
        self._statuses: dict[str, tuple[dict[str, Any], float]] = {}
        self._status_lock = asyncio.Lock()
        self._target: Resolved | None = None
        self._target_at = -float("inf")
        self._target_lock = asyncio.Lock()
        self._requests = Counter(
            "raybackfill_http_requests_total", "HTTP requests by route and status", tag_keys=("route", "status")
        )
        self._errors = Counter(
            "raybackfill_http_errors_total", "HTTP errors by route and error type", tag_keys=("route", "type")
        )
        self._latency = Histogram(
            "raybackfill_http_request_seconds",
            "HTTP request latency",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("route",),
        )
        batched: Any = self._search_batch  # serve.batch adds these setters; its type hints do not say so
        batched.set_max_batch_size(self.config.max_batch_size)
        batched.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        logger.info(
            "search service for index %r on %s: encoders %s, mixed phases served by %s",
            self.config.index, self.device, self.encoders.query_spaces if self.encoders else "none", self.during,
        )  # fmt: skip

    def _mixed_strategy(self) -> Strategy:
        """What serves the mixed phases: the method's recipe when named, else what the encoders can make."""
        if self.config.method is not None:
            return get_recipe(self.config.method).query_strategy
        spaces = self.encoders.query_spaces if self.encoders else (Space.OLD, Space.NEW)
        if spaces == (Space.NEW,):
            return Strategy.COMPATIBLE
        if spaces == (Space.OLD,):
            return Strategy.OLD
        return Strategy.RANK_MERGE

    # ------------------------------------------------------------------ routes
    @api.post(
        "/search",
        response_model=SearchResponse,
        responses={
            400: {"model": ErrorResponse},
            401: {"model": ErrorResponse},
            413: {"model": ErrorResponse},
            503: {"model": ErrorResponse},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": SearchBody.model_json_schema()},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "image": {"type": "string", "format": "binary"},
                                "text": {"type": "string"},
                                "k": {"type": "integer", "minimum": 1},
                                "strategy": {"type": "string", "enum": [s.value for s in Strategy]},
                                "params": {"type": "string", "description": "JSON object of names to numbers"},
                            },
                        }
                    },
                },
            }
        },
    )
    async def search(self, request: Request) -> JSONResponse:
        return await self._route(request, "/search", self._search)

    @api.get("/status", responses={503: {"model": ErrorResponse}})
    async def status(self, request: Request) -> JSONResponse:
        return await self._route(request, "/status", self._status_body)

    @api.get("/healthz", responses={503: {"model": ErrorResponse}})
    async def healthz(self, request: Request) -> JSONResponse:
        return await self._route(request, "/healthz", self._health_body)

    # ------------------------------------------------------------------ request handling
    async def _route(self, request: Request, route: str, handler) -> JSONResponse:
        started = time.perf_counter()
        try:
            self._authorise(request, route)
            response = JSONResponse(await handler(request))
        except ServiceError as err:
            err.message = redact(err.message, self._secrets)
            response = JSONResponse(err.body(), status_code=err.status, headers=err.headers())
            self._errors.inc(tags={"route": route, "type": err.kind})
        except Exception:  # noqa: BLE001 - a bug must not leak a traceback (paths) to the client
            logger.exception("internal error on %s", route)
            internal = ServiceError(500, "internal", "internal error; the service log has the details")
            response = JSONResponse(internal.body(), status_code=500)
            self._errors.inc(tags={"route": route, "type": internal.kind})
        self._requests.inc(tags={"route": route, "status": str(response.status_code)})
        self._latency.observe(time.perf_counter() - started, tags={"route": route})
        return response

    def _authorise(self, request: Request, route: str) -> None:
        if self._key_digest is None or route in OPEN_PATHS:
            return
        given = request.headers.get(API_KEY_HEADER, "")
        # Compare digests of equal length in constant time: the key's length does not leak either.
        if not given or not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), self._key_digest):
            raise ServiceError(401, "unauthorized", f"missing or wrong API key (header {API_KEY_HEADER})")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ServiceError(413, "too_large", f"request body over the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ServiceError(413, "too_large", f"request body over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _search(self, request: Request) -> dict:
        body = await self._read_body(request)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            parsed = await self._parse_multipart(request, body)
        elif kind in ("application/json", ""):
            try:
                payload = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise bad_request("body", "not valid JSON") from None
            parsed = parse_search(payload, max_queries=self.config.max_queries)
        else:
            raise ServiceError(415, "unsupported_media_type", "send application/json or multipart/form-data")
        if parsed.k > self.config.max_k:
            raise bad_request("k", f"{parsed.k} is over the limit of {self.config.max_k}")
        target = await self._resolve()
        status = await self._cached_status(target.index)
        strategy = parsed.strategy or serving_strategy(status["phase"], self.during)
        if not parsed.contents:
            self._check_vectors(parsed, strategy, status)
        elif self.encoders is None:
            raise bad_request("query", "this service embeds no raw queries (no encoder configured): send vectors")
        else:
            missing = self.encoders.missing(strategy)
            if missing:
                raise bad_request("strategy", str(MissingEncoderError(strategy, missing)))
            try:
                self.encoders.check_index(status, strategy)
            except EncoderMismatchError as err:
                raise ServiceError(409, "encoder_mismatch", str(err)) from None
        outcome = await self._search_batch(_Job(parsed, strategy, target.index))
        if outcome.error is not None:
            raise outcome.error
        assert outcome.topk is not None
        status = await self._versions_for(outcome.topk, status, target.index)
        return {
            "index": target.index,
            "alias": target.alias,
            "phase": status["phase"],
            "strategy": strategy.value,
            "k": parsed.k,
            "results": hits_json(outcome.topk, status),
        }

    async def _parse_multipart(self, request: Request, body: bytes) -> SearchRequest:
        async def once():
            yield body

        try:
            form = await MultiPartParser(
                request.headers, once(), max_files=1, max_fields=8, max_part_size=self.config.max_body_bytes
            ).parse()
        except MultiPartException as err:
            raise bad_request("body", f"malformed multipart form ({err.message})") from None
        unknown = sorted(set(form.keys()) - {"image", "text", "k", "strategy", "params"})
        if unknown:
            raise bad_request(unknown[0], "unknown form field; expected image or text, k, strategy, params")
        upload, text = form.get("image"), form.get("text")
        if (upload is None) == (text is None):
            raise bad_request("query", "a multipart search needs an image file field or a text field (one)")
        content: bytes | str
        if upload is not None:
            if not isinstance(upload, UploadFile):
                raise bad_request("image", "send the image as a file field")
            content = await upload.read()
            if not content:
                raise bad_request("image", "empty image")
        else:
            if not isinstance(text, str):
                raise bad_request("text", "send the text as a plain form field, not a file")
            content = text
        strategy = form.get("strategy")
        params = form.get("params")
        try:
            params_value = json.loads(str(params)) if params is not None else None
        except json.JSONDecodeError:
            raise bad_request("params", "not a JSON object") from None
        try:
            chosen = parse(Strategy, str(strategy), what="strategy") if strategy is not None else None
        except ValueError as err:
            raise bad_request("strategy", str(err)) from None
        return SearchRequest(
            k=parse_k(form.get("k", str(DEFAULT_K))),
            strategy=chosen,
            params=parse_params(params_value),
            contents=[content],
        )

    def _check_vectors(self, request: SearchRequest, strategy: Strategy, status: dict) -> None:
        """Dims checked here, so one wrong vector fails its own request, not the batch it would have joined."""
        q_old, q_new = resolve_vectors(request, strategy)
        for name, queries in (("old", q_old), ("new", q_new)):
            held = status.get(f"{name}_space")
            if queries is not None and held and queries.shape[1] != held["dim"]:
                field = "vector" if Space.TRANSFORMED in request.vectors else f"vectors.{name}"
                raise bad_request(field, f"dim {queries.shape[1]}, but the index's {name} space has dim {held['dim']}")

    # ------------------------------------------------------------------ batching
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _search_batch(self, jobs: list[_Job]) -> list[_Outcome]:
        outcomes = [_Outcome() for _ in jobs]
        queries: list[tuple[np.ndarray | None, np.ndarray | None]] = [(None, None)] * len(jobs)
        await self._embed_contents(jobs, outcomes, queries)
        for i, job in enumerate(jobs):
            if not job.request.contents:
                queries[i] = resolve_vectors(job.request, job.strategy)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            if outcomes[i].error is None:
                params = tuple(sorted((job.request.params or {}).items()))
                groups[(job.index, job.strategy, job.request.k, params)].append(i)
        results = await asyncio.gather(
            *(self._search_group(key, members, queries, outcomes) for key, members in groups.items()),
            return_exceptions=True,
        )
        for (_, members), result in zip(groups.items(), results, strict=True):
            if isinstance(result, BaseException):  # a bug or an unexpected Ray error: only this group fails
                logger.error("search of %d requests failed", len(members), exc_info=result)
                for i in members:
                    outcomes[i].error = ServiceError(500, "internal", "internal error; the service log has the details")
        return outcomes

    async def _embed_contents(self, jobs: list[_Job], outcomes: list[_Outcome], queries: list) -> None:
        """Every raw query of the batch through the encoders, one pass per strategy (off the event loop)."""
        by_strategy: dict[Strategy, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            if job.request.contents:
                by_strategy[job.strategy].append(i)
        for strategy, members in by_strategy.items():
            contents = [c for i in members for c in jobs[i].request.contents]
            owner = [i for i in members for _ in jobs[i].request.contents]
            assert self.encoders is not None
            try:
                embedded = await asyncio.to_thread(self.encoders.embed, contents, strategy)
            except Exception as err:  # noqa: BLE001 - fails only these requests, the rest of the batch goes on
                logger.exception("embedding %d queries failed", len(contents))
                for i in members:
                    outcomes[i].error = ServiceError(500, "internal", f"the encoder failed ({type(err).__name__})")
                continue
            for row, reason in sorted(embedded.failed.items()):
                job = jobs[owner[row]]
                field = "image" if isinstance(job.request.contents[0], bytes) else "text"
                outcomes[owner[row]].error = bad_request(field, f"cannot embed this query: {reason}")
            start = 0
            for i in members:
                n = len(jobs[i].request.contents)
                if outcomes[i].error is None:
                    queries[i] = embedded.rows(range(start, start + n))
                start += n

    async def _search_group(self, key: tuple, members: list[int], queries: list, outcomes: list[_Outcome]) -> None:
        index, strategy, k, params = key
        parts_old = [queries[i][0] for i in members]
        parts_new = [queries[i][1] for i in members]
        q_old = None if parts_old[0] is None else np.concatenate(parts_old)
        q_new = None if parts_new[0] is None else np.concatenate(parts_new)
        try:
            topk = await self._index_search(index, q_old, q_new, k, strategy, dict(params) if params else None)
        except ServiceError as err:
            if err.status != 400 or len(members) == 1:
                for i in members:
                    outcomes[i].error = err
                return
            # A request the index refused: ask again one by one, so only the request at fault gets the error.
            await asyncio.gather(*(self._search_group(key, [i], queries, outcomes) for i in members))
            return
        start = 0
        for i in members:
            n = len(queries[i][0] if queries[i][0] is not None else queries[i][1])
            outcomes[i].topk = TopK(*(a[start : start + n] for a in topk))
            start += n

    # ------------------------------------------------------------------ the router
    async def _resolve(self, force: bool = False) -> Resolved:
        """The index ``config.index`` designates (itself, or an alias's target), read again once older than
        ``alias_ttl_s``. The clock starts before the read, so a resolution is never reused past that bound."""
        async with self._target_lock:
            now = time.monotonic()
            if force or self._target is None or now - self._target_at >= self.config.alias_ttl_s:
                try:
                    resolved = await asyncio.wait_for(
                        asyncio.to_thread(resolve, self.config.index), self.config.index_timeout_s
                    )
                except TimeoutError:
                    raise self._unavailable("the cluster's GCS did not answer the alias lookup; retry") from None
                except Exception as err:  # noqa: BLE001 - a GCS error is an outage for the client, not a bug
                    logger.warning("resolving %r failed: %s", self.config.index, err)
                    raise self._unavailable("the alias lookup failed; retry") from None
                if resolved != self._target:
                    if self._target is not None:
                        logger.info("%r now resolves to index %r (was %r)", self.config.index, resolved.index,
                                    self._target.index)  # fmt: skip
                    self._routers = {k: v for k, v in self._routers.items() if k == resolved.index}
                    self._searchers = {k: v for k, v in self._searchers.items() if k == resolved.index}
                    self._statuses = {k: v for k, v in self._statuses.items() if k == resolved.index}
                self._target, self._target_at = resolved, now
            return self._target

    def _connect(self, index: str):
        router = self._routers.get(index)
        if router is None:
            try:
                router = ray.get_actor(index, namespace=NAMESPACE)
            except ValueError:
                self._target_at = -float("inf")  # an alias may have moved on: read it again next time
                if index != self.config.index:
                    raise self._unavailable(
                        f"alias {self.config.index!r} points to index {index!r}, which is not running"
                    ) from None
                raise self._unavailable(f"no index named {self.config.index!r} is running") from None
            self._routers[index] = router
        return router

    def _forget(self, index: str) -> None:
        """After an outage: the index may be restarting, or destroyed (its handles never answer again) and an alias
        moved on. Find its router and shards by name again next time, and read an alias again."""
        self._routers.pop(index, None)
        self._searchers.pop(index, None)
        self._target_at = -float("inf")

    def _unavailable(self, message: str) -> ServiceError:
        return ServiceError(503, "index_unavailable", message, retry_after=self.config.retry_after_s)

    def _timed_out(self) -> ServiceError:
        return self._unavailable(f"the index did not answer within {self.config.index_timeout_s:g} s; retry")

    async def _call(self, index: str, method: str, *args, **kwargs):
        ref = getattr(self._connect(index), method).remote(*args, **kwargs)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(ref.future()), self.config.index_timeout_s)
        except TimeoutError:  # not cancelled: see IndexSearcher.search
            raise self._timed_out() from None
        except RayTaskError as err:
            cause = err.cause
            if isinstance(cause, IndexUnavailableError):
                raise self._unavailable("an index shard is down or restarting; no partial answer, retry") from None
            if isinstance(cause, ValueError):
                raise bad_request(field_of(str(cause)), str(cause)) from None
            raise
        except RayActorError:
            self._forget(index)
            raise self._unavailable("the index router is down or restarting; retry") from None

    async def _index_search(self, index: str, q_old, q_new, k: int, strategy: Strategy, params: dict | None) -> TopK:
        searcher = self._searchers.get(index)
        if searcher is None:
            searcher = IndexSearcher(await self._call(index, "search_targets"))
            self._searchers[index] = searcher
        try:
            return await asyncio.wait_for(
                searcher.search_async(q_old, q_new, k, strategy, params), self.config.index_timeout_s
            )
        except TimeoutError:  # the shards' calls finish on their own (IndexSearcher.search)
            raise self._timed_out() from None
        except IndexUnavailableError:
            self._forget(index)
            raise self._unavailable("an index shard is down or restarting; no partial answer, retry") from None
        except ValueError as err:
            raise bad_request(field_of(str(err)), str(err)) from None

    async def _cached_status(self, index: str, force: bool = False) -> dict:
        """The phase, progress and spaces (versions, dims) of ``index``, at most ``status_ttl_s`` old."""
        async with self._status_lock:
            now = time.monotonic()
            cached = self._statuses.get(index)
            if force or cached is None or now - cached[1] > self.config.status_ttl_s:
                progress, health = await asyncio.gather(self._call(index, "progress"), self._call(index, "health"))
                status = {
                    "progress": dataclasses.asdict(progress),
                    "phase": str(progress.phase),
                    "old_space": health["old_space"],
                    "new_space": health["new_space"],
                    "promoted": health["promoted"],
                }
                self._statuses[index] = cached = (status, now)
            return cached[0]

    async def _versions_for(self, topk: TopK, status: dict, index: str) -> dict:
        """A hit in a space the cached status has no version for: that space was created since; refresh once."""
        used = {Space.from_code(c) for c in np.unique(topk.spaces[topk.ids != EMPTY_ID])}
        if any(not status.get(f"{'old' if s is Space.OLD else 'new'}_space") for s in used):
            return await self._cached_status(index, force=True)
        return status

    async def _status_body(self, request: Request) -> dict:
        target = await self._resolve(force=True)
        status = await self._cached_status(target.index, force=True)
        return {
            "index": target.index,
            "alias": target.alias,
            **status["progress"],
            "old_space": status["old_space"],
            "new_space": status["new_space"],
            "promoted": status["promoted"],
            "default_strategy": serving_strategy(status["phase"], self.during).value,
            "query_spaces": [s.value for s in self.encoders.query_spaces] if self.encoders else [],
        }

    async def _health_body(self, request: Request) -> dict:
        target = await self._resolve()
        status = await self._cached_status(target.index, force=True)
        alias = {"alias": target.alias} if target.alias else {}
        return {"ok": True, "index": target.index, **alias, "phase": status["phase"]}


def deployment_options(config: ServiceConfig) -> dict[str, Any]:
    """Serve options of the deployment: autoscaling between the replica bounds, CPUs and GPUs per replica, and the
    nice value replicas start at."""
    return {
        "autoscaling_config": {
            "min_replicas": config.min_replicas,
            "initial_replicas": max(config.min_replicas, 1),
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
        },
        "max_ongoing_requests": max(2 * config.max_batch_size, int(4 * config.target_ongoing_requests)),
        "ray_actor_options": {
            "num_cpus": config.num_cpus,
            "num_gpus": config.num_gpus,
            "runtime_env": started_at_nice(config.serving_nice),
        },
    }


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The Serve application; ``serve run raybackfill.service.app:build_app index=...`` or a RayService uses it.

    Args:
        args: Serve's application args; keys and defaults in :mod:`raybackfill.service.config`.

    Returns:
        The bound application (deploy it with ``serve.run``).

    Example:
        >>> app = build_app({"index": "raybackfill-router", "new_model": "s3://bucket/models/new"})  # doctest: +SKIP
        >>> serve.run(app, name="raybackfill", route_prefix="/")  # doctest: +SKIP
    """
    config = ServiceConfig.from_args(args)
    if config.psi_model:  # the adapter gate, before any replica starts: a psi mapping the wrong way, or below the bar
        check_adapter(config.psi_model, config.min_adapter_recall, direction=AdapterDirection.NEW_TO_OLD)
    elif config.min_adapter_recall is not None:
        raise ValueError("min_adapter_recall gates psi_model, and none was given")
    return SearchService.options(**deployment_options(config)).bind(config.to_args())  # type: ignore[attr-defined]


def running_proxy() -> tuple[str, int] | None:
    """(host, port) of the HTTP proxy of the Serve instance already running on this Ray cluster, or None.

    Why: Serve fixes its proxy's address when it first starts on a cluster, and a later ``serve.start`` with
    other ``http_options`` only logs that they are ignored; Serve has no public getter for the address, so it
    is read from the controller client.
    """
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    return str(client.http_config.host), int(client.http_config.port)


def deploy(config: ServiceConfig, *, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME) -> str:
    """Start Serve's HTTP proxy on ``host:port`` (loopback by default) and run the service; returns its URL.

    Needs a connected Ray (the CLI attaches first). The application outlives this process: Serve's controller
    is detached. A second deploy under the same ``name`` updates it in place.

    Example:
        >>> deploy(ServiceConfig(new_model="models/new"), port=8000)  # doctest: +SKIP
        'http://127.0.0.1:8000'
    """
    running = running_proxy()
    if running is not None and running != (host, port):
        raise ValueError(
            f"Serve already runs on this Ray cluster with its HTTP proxy at http://{running[0]}:{running[1]}, and "
            f"a proxy's address is fixed when Serve starts: deploy with --host {running[0]} --port {running[1]}, or "
            "stop Serve first (`serve shutdown`)"
        )
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config.to_args()), name=name, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def undeploy(name: str = APP_NAME) -> None:
    """Remove the service (the index keeps running)."""
    serve.delete(name)
