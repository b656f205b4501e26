"""A small client of the HTTP search service (urllib only: no Ray, no Serve), for the CLI, the demo and benchmarks.

It answers in the router's own shape (:class:`~raybackfill.index.merge.TopK`), so code written against
``router.search`` (live quality, the demo's query client) queries through HTTP unchanged, and an HTTP error
comes back as the exception the router would have raised: a 503 as
:class:`~raybackfill.index.router.IndexUnavailableError`, a 4xx as ``ValueError`` naming the field.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import numpy as np

from raybackfill.index.merge import EMPTY_ID, TopK, worst_score
from raybackfill.index.router import IndexUnavailableError
from raybackfill.service.api import API_KEY_HEADER
from raybackfill.types import Metric, Space, Strategy, parse


class ServiceHTTPError(ValueError):
    """A 4xx from the service: ``status``, ``kind`` and ``field`` as its JSON error said."""

    def __init__(self, status: int, kind: str, message: str, field: str | None) -> None:
        super().__init__(f"HTTP {status} {kind}: {message}")
        self.status, self.kind, self.field = status, kind, field


@dataclass
class ServiceClient:
    """Talks to ``url`` (e.g. ``http://127.0.0.1:8000``); ``api_key`` goes in the ``X-API-Key`` header.

    Example:
        >>> client = ServiceClient("http://127.0.0.1:8000")  # doctest: +SKIP
        >>> client.search({"text": "a red bicycle", "k": 5})["results"][0][0]["id"]  # doctest: +SKIP
    """

    url: str
    api_key: str | None = None
    timeout_s: float = 60.0
    metric: Metric = Metric.COSINE  # for the empty-slot score of search_topk only
    max_queries: int = 64  # queries per request of search_topk (the service's max_queries)

    @classmethod
    def from_env(cls, url: str, api_key_env: str | None = None) -> ServiceClient:
        """A client whose API key is the value of the environment variable ``api_key_env`` (a key on a command
        line would land in the shell's history and the process list)."""
        key = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"--api-key-env {api_key_env}: that environment variable is unset or empty")
        return cls(url, api_key=key)

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> Any:
        """One HTTP call; the decoded JSON answer, or the typed exception of its error."""
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.api_key:
            headers[API_KEY_HEADER] = self.api_key
        req = urllib.request.Request(self.url.rstrip("/") + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise _typed(err) from None

    def search(self, body: dict) -> dict:
        """``POST /search`` with a JSON body (see :mod:`raybackfill.service.api`)."""
        return self.request("POST", "/search", json.dumps(body).encode(), "application/json")

    def search_image(self, image: bytes, **fields: Any) -> dict:
        """``POST /search`` with one base64 image (``k``, ``strategy``, ``params`` as keywords)."""
        return self.search({"image": base64.b64encode(image).decode(), **fields})

    def status(self) -> dict:
        return self.request("GET", "/status")

    def healthz(self) -> dict:
        return self.request("GET", "/healthz")

    def search_topk(
        self,
        queries_old: np.ndarray | None,
        queries_new: np.ndarray | None,
        k: int,
        strategy: Strategy | str,
        params: dict | None = None,
    ) -> TopK:
        """``router.search`` over HTTP: vectors in, (nq, k) arrays out (empty slots id -1)."""
        strategy = parse(Strategy, strategy)
        vectors = {
            name: np.asarray(q, dtype=np.float32).reshape(-1, np.shape(q)[-1]).tolist()
            for name, q in (("old", queries_old), ("new", queries_new))
            if q is not None
        }
        n = len(next(iter(vectors.values())))
        results: list[list[dict]] = []
        for start in range(0, n, self.max_queries):  # the service bounds the queries of one request
            chunk = {name: rows[start : start + self.max_queries] for name, rows in vectors.items()}
            body: dict[str, Any] = {"vectors": chunk, "k": int(k), "strategy": strategy.value}
            if params:
                body["params"] = params
            results += self.search(body)["results"]
        return as_topk(results, k, self.metric)

    def wait_ready(self, timeout_s: float = 60.0, interval_s: float = 0.5) -> dict:
        """Poll ``/healthz`` until the service and its index answer; the last error after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.healthz()
            except (IndexUnavailableError, OSError) as err:
                if time.monotonic() > deadline:
                    raise IndexUnavailableError(f"{self.url} not ready after {timeout_s:.0f} s: {err}") from None
            time.sleep(interval_s)


def as_topk(results: list[list[dict]], k: int, metric: Metric | str = Metric.COSINE) -> TopK:
    """The JSON hits of a search answer as the router's (nq, k) arrays, padded with empty slots."""
    n = len(results)
    ids = np.full((n, k), EMPTY_ID, dtype=np.int64)
    scores = np.full((n, k), worst_score(metric), dtype=np.float32)
    spaces = np.zeros((n, k), dtype=np.int8)
    for row, hits in enumerate(results):
        for col, hit in enumerate(hits[:k]):
            ids[row, col], scores[row, col] = hit["id"], hit["score"]
            spaces[row, col] = parse(Space, hit["space"]).code
    return TopK(ids, scores, spaces)


def _typed(err: urllib.error.HTTPError) -> Exception:
    try:
        detail = json.loads(err.read()).get("error", {})
    except (json.JSONDecodeError, AttributeError, OSError):
        detail = {}
    message = detail.get("message", err.reason)
    if err.code == 503:
        return IndexUnavailableError(f"HTTP 503: {message} (retry after {err.headers.get('Retry-After')} s)")
    if 400 <= err.code < 500:
        return ServiceHTTPError(err.code, detail.get("type", "error"), message, detail.get("field"))
    return RuntimeError(f"HTTP {err.code}: {message}")
