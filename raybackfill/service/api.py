"""The HTTP service's request and response shapes, their validation, and its typed errors (no Ray, no torch).

A search names its query in exactly one of four ways, each a single query or a list of them:

- ``image``: base64-encoded image bytes (PNG, JPEG, anything PIL reads), or a multipart upload;
- ``text``: a string;
- ``vector``: a vector in the one space the strategy queries (``old``: the old space, ``compatible``: the new);
- ``vectors``: ``{"old": ..., "new": ...}`` vectors per space (``rank_merge`` needs both).

plus ``k``, ``strategy`` (default: what the index's phase serves best) and ``params`` (search parameters such
as ``nprobe`` / ``efSearch``: names to numbers, passed to the index only when given).

Every refusal is a :class:`ServiceError` with an HTTP status, a type and, for a bad request, the field it is
about; its message never holds a model path, a URI or a credential (they are redacted by :func:`redact`).
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raybackfill.index.merge import EMPTY_ID, TopK
from raybackfill.types import Space, Strategy, parse

API_KEY_HEADER = "x-api-key"
DEFAULT_K = 10


class ServiceError(Exception):
    """A request the service refuses or cannot answer now: ``status``, ``kind``, ``field`` (4xx) and a message."""

    def __init__(
        self,
        status: int,
        kind: str,
        message: str,
        *,
        field: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.field, self.retry_after = status, kind, message, field, retry_after

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.kind, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


def bad_request(field_name: str, message: str) -> ServiceError:
    return ServiceError(400, "bad_request", f"{field_name}: {message}", field=field_name)


def redact(message: str, secrets: list[str]) -> str:
    """``message`` with every secret (model paths and URIs, keys, credentials) replaced by ``<redacted>``.

    Longer secrets first, so a path and its parent directory both disappear whole.

    Example:
        >>> redact("cannot read /models/new/model.json", ["/models/new"])
        'cannot read <redacted>/model.json'
    """
    for secret in sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True):
        message = message.replace(secret, "<redacted>")
    return message


# --------------------------------------------------------------------------- request / response models
Number = float | int


class SearchBody(BaseModel):
    """The JSON body of ``POST /search``."""

    model_config = ConfigDict(extra="forbid")

    image: str | list[str] | None = Field(None, description="base64 image bytes (one, or a list of queries)")
    text: str | list[str] | None = Field(None, description="query text (one, or a list of queries)")
    vector: list[float] | list[list[float]] | None = Field(
        None, description="a vector (or a list) in the space the strategy queries: old -> old, compatible -> new"
    )
    vectors: dict[Literal["old", "new"], list[float] | list[list[float]]] | None = Field(
        None, description='vectors per space, e.g. {"old": [...], "new": [...]} for rank_merge'
    )
    k: int = Field(DEFAULT_K, ge=1, description="results per query")
    strategy: Strategy | None = Field(None, description="old, compatible or rank_merge; default: the phase's best")
    # Any values here, so that parse_params names the parameter at fault; the schema still says "numbers".
    params: dict[str, Any] | None = Field(
        None,
        description='index search parameters, names to numbers, e.g. {"nprobe": 16}',
        json_schema_extra={"additionalProperties": {"type": "number"}},
    )


class Hit(BaseModel):
    id: int
    score: float
    space: Space
    model: str | None = Field(None, description="version of the model whose vector matched")


class SearchResponse(BaseModel):
    index: str = Field(description="the index that answered (an alias's target at the time of the request)")
    alias: str | None = Field(None, description="the alias the service resolved, when it fronts one")
    phase: str
    strategy: Strategy
    k: int
    results: list[list[Hit]] = Field(description="one list of hits per query, best first")


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --------------------------------------------------------------------------- parsed queries
@dataclass
class SearchRequest:
    """A validated search: raw contents (bytes for images, str for texts) or vectors per space."""

    k: int
    strategy: Strategy | None
    params: dict[str, float | int] | None
    contents: list[bytes | str] = field(default_factory=list)
    vectors: dict[Space, np.ndarray] = field(default_factory=dict)

    @property
    def n_queries(self) -> int:
        if self.contents:
            return len(self.contents)
        return len(next(iter(self.vectors.values())))


QUERY_FIELDS = ("image", "text", "vector", "vectors")


def parse_search(payload: Any, *, max_queries: int) -> SearchRequest:
    """Validate a decoded JSON body into a :class:`SearchRequest`, or raise a 400 naming the field."""
    if not isinstance(payload, dict):
        raise bad_request("body", "expected a JSON object")
    try:
        body = SearchBody.model_validate(payload)
    except ValidationError as err:
        first = err.errors()[0]
        name = ".".join(str(p) for p in first["loc"][:1]) or "body"
        if first["type"] == "extra_forbidden":
            raise bad_request(name, f"unknown field; expected one of {', '.join(SearchBody.model_fields)}") from None
        raise bad_request(name, str(first["msg"])) from None
    given = [name for name in QUERY_FIELDS if getattr(body, name) is not None]
    if len(given) != 1:
        raise bad_request("query", f"give exactly one of {', '.join(QUERY_FIELDS)} (got {len(given) or 'none'})")
    params = parse_params(payload.get("params"))
    request = SearchRequest(k=body.k, strategy=body.strategy, params=params)
    source = given[0]
    if source == "image":
        images = [body.image] if isinstance(body.image, str) else list(body.image or [])
        request.contents = [
            _base64(text, f"image[{i}]" if len(images) > 1 else "image") for i, text in enumerate(images)
        ]
    elif source == "text":
        request.contents = [body.text] if isinstance(body.text, str) else list(body.text or [])
    elif source == "vector":
        request.vectors = {_VECTOR_SPACE: _matrix(body.vector, "vector")}
    else:
        assert body.vectors is not None
        request.vectors = {parse(Space, name): _matrix(v, f"vectors.{name}") for name, v in body.vectors.items()}
        if not request.vectors:
            raise bad_request("vectors", 'give "old" and/or "new" vectors')
        counts = {len(v) for v in request.vectors.values()}
        if len(counts) != 1:
            raise bad_request("vectors", "old and new must hold the same number of queries")
    if request.contents is not None and source in ("image", "text") and not request.contents:
        raise bad_request(source, "an empty list: send at least one query")
    if request.n_queries > max_queries:
        raise bad_request(source, f"{request.n_queries} queries, more than the limit of {max_queries} per request")
    return request


# A bare "vector" is stored under this key until the strategy says which space it is in (see resolve_vectors).
_VECTOR_SPACE = Space.TRANSFORMED


def resolve_vectors(request: SearchRequest, strategy: Strategy) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(queries_old, queries_new) of a vector request for ``strategy``, or a 400 naming the missing field."""
    vectors = dict(request.vectors)
    if _VECTOR_SPACE in vectors:
        bare = vectors.pop(_VECTOR_SPACE)
        if strategy is Strategy.RANK_MERGE:
            raise bad_request("vector", 'rank_merge needs two queries: send "vectors": {"old": [...], "new": [...]}')
        vectors[Space.OLD if strategy is Strategy.OLD else Space.NEW] = bare
    need_old = strategy in (Strategy.OLD, Strategy.RANK_MERGE)
    need_new = strategy in (Strategy.COMPATIBLE, Strategy.RANK_MERGE)
    for space, needed in ((Space.OLD, need_old), (Space.NEW, need_new)):
        if needed and space not in vectors:
            raise bad_request(f"vectors.{space}", f"strategy {strategy.value!r} needs a {space}-space query vector")
    return (vectors[Space.OLD] if need_old else None), (vectors[Space.NEW] if need_new else None)


def parse_params(value: Any) -> dict[str, float | int] | None:
    """Search parameters: a JSON object of names to finite numbers (booleans are not numbers here)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("params", "expected an object of parameter names to numbers")
    out: dict[str, float | int] = {}
    for name, number in value.items():
        if not isinstance(name, str) or not name:
            raise bad_request("params", "parameter names must be non-empty strings")
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise bad_request(f"params.{name}", "expected a finite number")
        out[name] = number
    return out


def parse_k(value: Any) -> int:
    """``k`` from a form field (a string): a positive integer."""
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise bad_request("k", "expected a positive integer") from None
    if k < 1:
        raise bad_request("k", "expected a positive integer")
    return k


def _base64(text: str, name: str) -> bytes:
    if text.startswith("data:") and ";base64," in text[:100]:  # a data URL, as browsers' FileReader makes them
        text = text.split(";base64,", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(name, "not valid base64") from None
    if not data:
        raise bad_request(name, "empty image")
    return data


def _matrix(value: Any, name: str) -> np.ndarray:
    rows = [value] if value and not isinstance(value[0], list) else value
    if not rows:
        raise bad_request(name, "empty: send at least one vector")
    widths = {len(r) for r in rows}
    if len(widths) != 1 or 0 in widths:
        raise bad_request(name, "every vector must have the same, non-zero length")
    matrix = np.asarray(rows, dtype=np.float32)
    if not np.isfinite(matrix).all():
        raise bad_request(name, "holds a NaN or infinite value")
    return matrix


def field_of(message: str) -> str:
    """The request field a router refusal is about."""
    if message.startswith("k "):
        return "k"
    for name, where in (("queries_old", "vectors.old"), ("queries_new", "vectors.new"), ("param", "params")):
        if name in message:
            return where
    return "query"


def hits_json(topk: TopK, status: dict) -> list[list[dict]]:
    """The hits of each query (empty slots dropped), each with the model version of the space it matched in."""
    versions = {
        Space.OLD: (status.get("old_space") or {}).get("version"),
        Space.TRANSFORMED: (status.get("new_space") or {}).get("version"),
        Space.NEW: (status.get("new_space") or {}).get("version"),
    }
    out = []
    for ids, scores, spaces in zip(topk.ids, topk.scores, topk.spaces, strict=True):
        row = []
        for i, s, c in zip(ids.tolist(), scores.tolist(), spaces.tolist(), strict=True):
            if i == EMPTY_ID:
                continue
            space = Space.from_code(c)
            row.append({"id": i, "score": s, "space": space.value, "model": versions[space]})
        out.append(row)
    return out
