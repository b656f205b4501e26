"""The HTTP search service fronting an alias, on the session's Ray cluster over loopback: requests follow
`alias set` without a restart, within the service's ``alias_ttl_s``, and no answer mixes two indexes.

Blue (ids 0..n-1) and green (ids 10_000..) hold vectors of the same text encoder version; red holds another
version, so the service's encoder check must refuse raw text queries (409) once the alias points there."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid

import numpy as np
import pytest

from raybackfill.data.preprocessing import TextPreprocessing
from raybackfill.encoders import EncoderSource, EntrypointTrust, register_encoder
from raybackfill.index.aliases import remove_alias, set_alias
from raybackfill.index.router import IndexUnavailableError, RouterConfig, create_index, destroy_index, get
from raybackfill.service.client import ServiceClient, ServiceHTTPError
from raybackfill.service.config import ServiceConfig
from raybackfill.types import EncoderKind

TEXT_ENTRYPOINT = "encoder_plugins:make_text_encoder"
N, D = 20, 16
GREEN_FIRST = 10_000
TTL_S = 0.3  # the service's alias_ttl_s: a request sent longer than this after a switch must see the new index


def _index(name: str, first_id: int, seed: int, version: str) -> None:
    router = create_index(RouterConfig(name=name, shards=2, shard_num_cpus=0))
    vectors = np.random.default_rng(seed).standard_normal((N, D)).astype(np.float32)
    get(router.load_old.remote(np.arange(first_id, first_id + N), vectors, version))


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    from ray import serve

    from benchmarks.bench_http import start_serve
    from raybackfill.service.app import build_app

    tag = uuid.uuid4().hex[:6]
    names = {colour: f"svc-alias-{colour}-{tag}" for colour in ("blue", "green", "red")}
    _index(names["blue"], 0, seed=0, version="text-v1")
    _index(names["green"], GREEN_FIRST, seed=1, version="text-v1")
    _index(names["red"], 50_000, seed=2, version="text-v2")
    alias = f"search-{tag}"
    set_alias(alias, names["blue"])

    text_uri = str(tmp_path_factory.mktemp("alias-service") / "text-v1")
    register_encoder(
        EncoderSource(
            EncoderKind.ENTRYPOINT, "text-v1", entrypoint=TEXT_ENTRYPOINT, kwargs={"dim": D},
            preprocessing=TextPreprocessing(),
        ),
        text_uri,
        trust=EntrypointTrust((TEXT_ENTRYPOINT,)),
    )  # fmt: skip
    port = start_serve()
    args = {"index": alias, "old_model": text_uri, "trust_entrypoints": [TEXT_ENTRYPOINT], "alias_ttl_s": TTL_S}
    serve.run(
        build_app({**args, "min_replicas": 1, "max_replicas": 1, "num_cpus": 0}),
        name=f"alias-{tag}",
        route_prefix=f"/alias-{tag}",
    )
    client = ServiceClient(f"http://127.0.0.1:{port}/alias-{tag}")
    client.wait_ready()
    yield {"client": client, "alias": alias, **names, "tag": tag}
    serve.delete(f"alias-{tag}")
    with contextlib.suppress(ValueError):
        remove_alias(alias)
    for name in names.values():
        with contextlib.suppress(ValueError):
            destroy_index(name)


def _colour(answer: dict) -> str:
    ids = [h["id"] for h in answer["results"][0]]
    assert len(ids) == N and len(set(ids)) == N, ids  # the whole index, each id once
    if set(ids) == set(range(N)):
        return "blue"
    assert set(ids) == set(range(GREEN_FIRST, GREEN_FIRST + N)), f"an answer mixes two indexes: {ids}"
    return "green"


def _switch_and_wait(alias: str, index: str) -> None:
    set_alias(alias, index)
    time.sleep(TTL_S * 1.5)  # past the documented staleness bound: every later request resolves anew


def test_requests_follow_a_switch_within_the_ttl_and_never_mix_indexes(service):
    client, alias = service["client"], service["alias"]
    _switch_and_wait(alias, service["blue"])
    query = {"vector": np.random.default_rng(4).standard_normal(D).tolist(), "k": N, "strategy": "old"}
    answers: list[tuple[float, str]] = []  # (time the request was sent, colour)
    errors: list[BaseException] = []
    stop = threading.Event()

    def loop() -> None:
        try:
            while not stop.is_set():
                sent = time.monotonic()
                answer = client.search(query)
                colour = _colour(answer)
                assert answer["index"] == service[colour] and answer["alias"] == alias, answer
                answers.append((sent, colour))
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=loop) for _ in range(3)]  # concurrent requests share Serve batches
    for thread in threads:
        thread.start()
    try:
        _wait(lambda: len(answers) >= 10 or errors)
        set_alias(alias, service["green"])
        switched = time.monotonic()
        _wait(lambda: sum(1 for t, _ in answers if t > switched + TTL_S) >= 10 or errors)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not errors, errors
    assert answers[0][1] == "blue"
    late = {colour for sent, colour in answers if sent > switched + TTL_S}
    assert late == {"green"}, answers
    status = client.status()
    assert (status["alias"], status["index"], status["total"]) == (alias, service["green"], N)
    assert client.healthz() == {"ok": True, "index": service["green"], "alias": alias, "phase": "idle"}


def test_an_index_of_another_encoder_version_is_refused_409_not_answered(service):
    client, alias = service["client"], service["alias"]
    _switch_and_wait(alias, service["green"])
    answer = client.search({"text": "a sleepy grey cat", "k": 3})
    assert answer["index"] == service["green"] and answer["results"][0][0]["id"] >= GREEN_FIRST

    _switch_and_wait(alias, service["red"])  # red's old space holds text-v2; the service's encoder is text-v1
    with pytest.raises(ServiceHTTPError) as err:
        client.search({"text": "a sleepy grey cat", "k": 3})
    assert err.value.status == 409 and err.value.kind == "encoder_mismatch"
    assert "'text-v2'" in str(err.value) and "'text-v1'" in str(err.value)
    assert client.status()["old_space"]["version"] == "text-v2"

    _switch_and_wait(alias, service["green"])  # the rollback: the same text query answers again
    assert client.search({"text": "a sleepy grey cat", "k": 3})["index"] == service["green"]


def test_an_alias_to_a_stopped_index_is_a_503_naming_both(service):
    client, alias = service["client"], service["alias"]
    gone = f"svc-alias-gone-{service['tag']}"
    _index(gone, 70_000, seed=3, version="text-v1")
    _switch_and_wait(alias, gone)
    assert client.search({"text": "cat", "k": 2})["index"] == gone
    destroy_index(gone)
    with pytest.raises(IndexUnavailableError, match="503"):  # the router it held is dead: a 503, re-resolved
        client.search({"text": "cat", "k": 2})
    with pytest.raises(IndexUnavailableError, match=f"alias '{alias}' points to index '{gone}', which is not running"):
        client.search({"text": "cat", "k": 2})
    _switch_and_wait(alias, service["green"])
    assert client.search({"text": "cat", "k": 2})["index"] == service["green"]


def test_alias_ttl_must_be_non_negative():
    assert ServiceConfig.from_args({"alias_ttl_s": "0"}).alias_ttl_s == 0.0
    with pytest.raises(ValueError, match="alias_ttl_s must be non-negative"):
        ServiceConfig(alias_ttl_s=-1)


def _wait(condition, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
