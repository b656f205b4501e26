"""The HTTP search service on the session's real Ray cluster, queried over loopback with a real HTTP client.

One Serve start-up for the module (it is the slow part): two applications behind one proxy,
- ``/img``: an image index (old model v1, new model v2, half the gallery backfilled) and the service with both
  image encoders (the old one records no crop size, the new one a 16-pixel crop);
- ``/txt``: a text index (an entrypoint text encoder) whose service requires an API key.
Answers are checked against the router's own top-k for the same vectors, computed here with the same models.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from benchmarks.bench_http import start_serve
from raybackfill import NAMESPACE
from raybackfill.data.preprocessing import ImagePreprocessing, TextPreprocessing
from raybackfill.data.synth import synthesize
from raybackfill.encoders import EntrypointTrust, load_encoder
from raybackfill.index.router import RouterConfig, create_index, destroy_index, get
from raybackfill.models.artifacts import ModelSpec, save_model
from raybackfill.models.backbones import small_cnn
from raybackfill.service.client import ServiceClient, ServiceHTTPError
from raybackfill.types import EncoderKind, Space, Strategy

ROOT = Path(__file__).resolve().parent.parent
TEXT_ENTRYPOINT = "encoder_plugins:make_text_encoder"
API_KEY = "test-key-" + uuid.uuid4().hex
TEXTS = ["red bicycle with a bell", "a sleepy grey cat", "blue electric car", "dog chasing a ball", "old steam train"]
K = 6


def _model(path: Path, version: str, seed: int, crop: int | None) -> str:
    torch.manual_seed(seed)
    kwargs = {"embedding_dim": 8, "num_classes": 4, "width": 4}
    spec = ModelSpec(
        "small_cnn",
        version,
        kwargs=kwargs,
        preprocessing=ImagePreprocessing(crop=crop).to_dict() if crop else {},
    )
    save_model(small_cnn(**kwargs).eval(), str(path), spec)
    return str(path)


def _embed(uri: str, images: list[bytes], **kw) -> np.ndarray:
    encoder = load_encoder(uri, **kw)
    if isinstance(images[0], bytes):
        encoder.with_size(16)
    vectors, ok, _ = encoder.embed_rows(images)
    assert ok.all()
    return vectors


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    from ray import serve

    from raybackfill.service.app import build_app

    tmp = tmp_path_factory.mktemp("service")
    table = synthesize(classes=4, per_class=6, size=16, seed=3)
    images = table.column("image").to_pylist()
    ids = table.column("id").to_numpy().astype(np.int64) + 500
    old_uri = _model(tmp / "models" / "old-v1", "v1", seed=0, crop=None)
    new_uri = _model(tmp / "models" / "new-v2", "v2", seed=1, crop=16)
    old_vectors, new_vectors = _embed(old_uri, images), _embed(new_uri, images)

    tag = uuid.uuid4().hex[:6]
    img_index, txt_index = f"svc-img-{tag}", f"svc-txt-{tag}"
    router = create_index(RouterConfig(name=img_index, shards=2, shard_num_cpus=0))
    get(router.load_old.remote(ids, old_vectors, "v1"))
    get(router.upsert.remote(ids[::2], new_vectors[::2], Space.NEW, "v2"))
    get(router.set_phase.remote("backfill"))

    text_uri = str(tmp / "models" / "text-v1")
    from raybackfill.encoders import EncoderSource, register_encoder

    register_encoder(
        EncoderSource(
            EncoderKind.ENTRYPOINT,
            "text-v1",
            entrypoint=TEXT_ENTRYPOINT,
            kwargs={"dim": 16},
            preprocessing=TextPreprocessing(),
        ),
        text_uri,
        trust=EntrypointTrust((TEXT_ENTRYPOINT,)),
    )
    text_vectors = _embed(text_uri, TEXTS, trust=EntrypointTrust((TEXT_ENTRYPOINT,)))
    text_router = create_index(RouterConfig(name=txt_index, shards=2, shard_num_cpus=0))
    get(text_router.load_old.remote(np.arange(len(TEXTS)) + 10, text_vectors, "text-v1"))

    port = start_serve()
    # No CPU reserved by the replicas and the test indexes: the demo test runs Ray Data tasks that need whole CPUs.
    common = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0}
    serve.run(
        build_app({"index": img_index, "old_model": old_uri, "new_model": new_uri, **common}),
        name=f"img-{tag}",
        route_prefix="/img",
    )
    serve.run(
        build_app(
            {
                "index": txt_index,
                "old_model": text_uri,
                "trust_entrypoints": [TEXT_ENTRYPOINT],
                "api_key_sha256": hashlib.sha256(API_KEY.encode()).hexdigest(),
                "max_body_bytes": 4096,
                **common,
            }
        ),
        name=f"txt-{tag}",
        route_prefix="/txt",
    )
    from raybackfill.demo.online import INDEX_NAME as DEMO_INDEX

    serve.run(build_app({"index": DEMO_INDEX, **common}), name=f"demo-{tag}", route_prefix="/demo")
    base = f"http://127.0.0.1:{port}"
    yield {
        "base": base,
        "port": port,
        "img": ServiceClient(f"{base}/img"),
        "txt": ServiceClient(f"{base}/txt", api_key=API_KEY),
        "router": router,
        "text_router": text_router,
        "images": images,
        "ids": ids,
        "old_uri": old_uri,
        "new_uri": new_uri,
        "text_uri": text_uri,
        "tmp": tmp,
        "txt_index": txt_index,
        "img_index": img_index,
        "img_app": f"img-{tag}",
        "table": table,
    }
    serve.shutdown()
    for name in (img_index, txt_index):
        with contextlib.suppress(ValueError):
            destroy_index(name)


def _router_hits(router, q_old, q_new, k, strategy, versions) -> list[list[tuple]]:
    top = get(router.search.remote(q_old, q_new, k, strategy))
    out = []
    for row in zip(top.ids, top.scores, top.spaces, strict=True):
        spaces = [Space.from_code(c) for c in row[2]]
        out.append(
            [(int(i), float(s), c.value, versions[c]) for i, s, c in zip(row[0], row[1], spaces, strict=True) if i >= 0]
        )
    return out


def _same(answer: dict, expected: list[list[tuple]], tie: float = 1e-4) -> None:
    """The same hits, scores within float noise. Near-ties (scores closer than ``tie``) may come in either order:
    the service embeds a batch of queries in one forward pass, and a batch changes the last bits of a vector."""
    got = [[(h["id"], h["score"], h["space"], h["model"]) for h in hits] for hits in answer["results"]]
    assert len(got) == len(expected)
    for row, want in zip(got, expected, strict=True):
        assert len(row) == len(want)
        np.testing.assert_allclose([h[1] for h in row], [w[1] for w in want], rtol=1e-5, atol=1e-5)
        start = 0
        for end in range(1, len(want) + 1):  # runs of tied expected scores: the same hits, in any order
            if end == len(want) or abs(want[end][1] - want[end - 1][1]) > tie:
                if end < len(want) or end - start == 1:  # a tie at the k-th place may swap in the next item
                    hits = sorted((h[0], h[2], h[3]) for h in row[start:end])
                    assert hits == sorted((w[0], w[2], w[3]) for w in want[start:end]), (row, want)
                start = end


VERSIONS = {Space.OLD: "v1", Space.TRANSFORMED: "v2", Space.NEW: "v2"}


def test_image_queries_json_and_multipart_agree_with_the_router_top_k(service):
    image = service["images"][5]
    q_old, q_new = _embed(service["old_uri"], [image]), _embed(service["new_uri"], [image])
    expected = _router_hits(service["router"], q_old, q_new, K, Strategy.RANK_MERGE, VERSIONS)
    assert {h[2] for h in expected[0]} == {"old", "new"}  # the answer mixes spaces: both queries mattered

    answer = service["img"].search_image(image, k=K)  # no strategy: the backfill phase serves rank_merge
    assert (answer["phase"], answer["strategy"], answer["k"]) == ("backfill", "rank_merge", K)
    _same(answer, expected)

    boundary = "rbtest" + uuid.uuid4().hex
    body = b"".join(
        [
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'.encode(),
            b"Content-Type: image/png\r\n\r\n" + image + b"\r\n",
            f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{K}\r\n--{boundary}--\r\n'.encode(),
        ]
    )
    multipart = service["img"].request("POST", "/search", body, f"multipart/form-data; boundary={boundary}")
    _same(multipart, expected)

    compatible = service["img"].search_image(image, k=K, strategy="compatible")
    _same(compatible, _router_hits(service["router"], None, q_new, K, Strategy.COMPATIBLE, VERSIONS))


def test_a_batch_of_images_and_concurrent_requests_each_get_their_own_answer(service):
    from concurrent.futures import ThreadPoolExecutor

    images = service["images"][:8]
    q_old, q_new = _embed(service["old_uri"], images), _embed(service["new_uri"], images)
    expected = _router_hits(service["router"], q_old, q_new, 3, Strategy.RANK_MERGE, VERSIONS)
    batch = service["img"].search({"image": [base64.b64encode(i).decode() for i in images], "k": 3})
    _same(batch, expected)
    with ThreadPoolExecutor(8) as pool:  # concurrent requests are batched together by the replica
        answers = list(pool.map(lambda im: service["img"].search_image(im, k=3), images))
    for answer, want in zip(answers, expected, strict=True):
        _same(answer, [want])


def test_vector_queries_agree_with_the_router_top_k(service):
    rng = np.random.default_rng(7)
    q_old, q_new = rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal((3, 8)).astype(np.float32)
    body = {"vectors": {"old": q_old.tolist(), "new": q_new.tolist()}, "k": K, "strategy": "rank_merge"}
    _same(service["img"].search(body), _router_hits(service["router"], q_old, q_new, K, "rank_merge", VERSIONS))
    one = service["img"].search({"vector": q_old[0].tolist(), "k": K, "strategy": "old"})
    _same(one, _router_hits(service["router"], q_old[:1], None, K, "old", VERSIONS))
    top = service["img"].search_topk(None, q_new, K, "compatible")  # the client's router-shaped answer
    np.testing.assert_array_equal(top.ids, get(service["router"].search.remote(None, q_new, K, "compatible")).ids)


def test_text_queries_agree_with_the_router_top_k_and_need_the_api_key(service):
    trust = EntrypointTrust((TEXT_ENTRYPOINT,))
    query = "a sleepy grey cat"
    q = _embed(service["text_uri"], [query], trust=trust)
    versions = {Space.OLD: "text-v1", Space.TRANSFORMED: None, Space.NEW: None}
    answer = service["txt"].search({"text": query, "k": 3})
    assert (answer["phase"], answer["strategy"]) == ("idle", "old")
    _same(answer, _router_hits(service["text_router"], q, None, 3, Strategy.OLD, versions))
    assert answer["results"][0][0]["id"] == 11 and answer["results"][0][0]["score"] == pytest.approx(1.0, abs=1e-5)
    form = f'--B\r\nContent-Disposition: form-data; name="text"\r\n\r\n{query}\r\n'
    form += '--B\r\nContent-Disposition: form-data; name="k"\r\n\r\n3\r\n--B--\r\n'
    _same(
        service["txt"].request("POST", "/search", form.encode(), "multipart/form-data; boundary=B"),
        [[(h["id"], h["score"], h["space"], h["model"]) for h in answer["results"][0]]],
    )

    for key in (None, "wrong", API_KEY[:-1]):
        with pytest.raises(ServiceHTTPError) as err:
            ServiceClient(service["txt"].url, api_key=key).search({"text": query})
        assert err.value.status == 401
    assert ServiceClient(service["txt"].url).healthz()["ok"] is True  # probes need no key
    with pytest.raises(ServiceHTTPError, match="401"):
        ServiceClient(service["txt"].url).status()


def test_status_healthz_and_openapi(service):
    status = service["img"].status()
    assert status["phase"] == "backfill" and status["default_strategy"] == "rank_merge"
    assert status["counts"] == {"old": 12, "transformed": 0, "new": 12} and status["total"] == 24
    assert status["old_space"]["version"] == "v1" and status["new_space"]["version"] == "v2"
    assert status["query_spaces"] == ["old", "new"]
    assert service["img"].healthz() == {"ok": True, "index": status["index"], "phase": "backfill"}
    schema = service["img"].request("GET", "/openapi.json")
    content = schema["paths"]["/search"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)
    assert {"image", "text", "vector", "vectors", "k", "strategy", "params"} <= set(
        content["application/json"]["schema"]["properties"]
    )


def _raw(url: str, body: bytes, content_type: str = "application/json", key: str | None = None):
    headers = {"Content-Type": content_type, **({"X-API-Key": key} if key else {})}
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read().decode()


def test_bad_requests_are_typed_4xx_naming_the_field_and_never_echo_paths_or_credentials(service):
    url = service["img"].url + "/search"
    png = base64.b64encode(service["images"][0]).decode()
    cases = [
        ({"image": png, "k": 0}, "k"),
        ({"image": png, "k": 100_000}, "k"),
        ({"image": png, "color": "red"}, "color"),
        ({"image": png, "text": "both"}, "query"),
        ({}, "query"),
        ({"image": "***not base64***"}, "image"),
        ({"image": base64.b64encode(b"\x89PNG\r\n\x1a\n truncated").decode()}, "image"),
        ({"text": "a text to an image service"}, "text"),
        ({"vector": [1.0, 2.0, 3.0], "strategy": "old"}, "vector"),
        ({"vector": [1.0] * 8, "strategy": "rank_merge"}, "vector"),
        ({"vectors": {"old": [1.0] * 8}, "strategy": "compatible"}, "vectors.new"),
        ({"vector": [[1.0] * 8, [1.0] * 7], "strategy": "old"}, "vector"),
        ({"image": png, "strategy": "newest"}, "strategy"),
        ({"image": png, "params": {"nprobe": "many"}}, "params.nprobe"),
        ({"image": png, "params": {"nprobe": True}}, "params.nprobe"),
        ({"image": png, "params": [1, 2]}, "params"),
        ({"image": [png] * 65}, "image"),
    ]
    bodies = []
    for payload, field in cases:
        status, _, text = _raw(url, json.dumps(payload).encode())
        assert status == 400, (payload, text)
        assert json.loads(text)["error"]["field"] == field, (payload, text)
        bodies.append(text)
    for fields, field in ((b'name="strategy"\r\n\r\nbest', "strategy"), (b'name="k"\r\n\r\nten', "k")):
        form = b"--B\r\nContent-Disposition: form-data; " + fields + b"\r\n--B\r\nContent-Disposition: form-data; "
        form += b'name="image"; filename="q.png"\r\n\r\n' + service["images"][0] + b"\r\n--B--\r\n"
        status, _, text = _raw(url, form, "multipart/form-data; boundary=B")
        assert status == 400 and json.loads(text)["error"]["field"] == field, text
        bodies.append(text)
    status, _, text = _raw(url, b"{not json")
    assert status == 400 and json.loads(text)["error"]["field"] == "body"
    status, _, text = _raw(url, b"x=1", "application/x-www-form-urlencoded")
    assert status == 415
    # A body over the text service's 4 KiB limit (with the right key), and a wrong-key request: 413, 401.
    status, _, text = _raw(service["txt"].url + "/search", json.dumps({"text": "x" * 5000}).encode(), key=API_KEY)
    assert status == 413 and json.loads(text)["error"]["type"] == "too_large"
    bodies.append(text)
    status, _, text = _raw(service["txt"].url + "/search", b'{"text": "cat"}', key="nope")
    assert status == 401
    bodies.append(text)

    forbidden = [service["old_uri"], service["new_uri"], service["text_uri"], str(service["tmp"]), API_KEY]
    forbidden += [os.environ[v] for v in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID") if os.environ.get(v)]
    for text in bodies:
        for secret in forbidden:
            assert secret not in text


def test_search_params_are_passed_only_when_given(service):
    """``params`` reaches the router only when a request carries it: the image index is Flat, which takes no
    search parameter, so the router's refusal comes back as a 400 naming the field and the parameter; without
    ``params`` the same query answers."""
    q = np.random.default_rng(3).standard_normal((1, 8)).astype(np.float32)
    body = {"vector": q[0].tolist(), "k": 3, "strategy": "old", "params": {"nprobe": 4}}
    with pytest.raises(ValueError, match="'nprobe' does not apply to index 'Flat'"):
        get(service["router"].search.remote(q, None, 3, "old", params={"nprobe": 4}))
    with pytest.raises(ServiceHTTPError) as err:
        service["img"].search(body)
    assert err.value.status == 400 and err.value.field == "params" and "nprobe" in str(err.value)
    body.pop("params")
    answer = service["img"].search(body)
    direct = get(service["router"].search.remote(q, None, 3, "old"))
    assert [h["id"] for h in answer["results"][0]] == direct.ids[0].tolist()


def test_eval_live_through_http_reads_the_same_quality_as_the_router(service, capsys):
    from raybackfill.cli.main import main
    from raybackfill.data.schema import embedding_table
    from raybackfill.data.storage import write_table

    probes = synthesize(classes=4, per_class=3, size=16, seed=11)
    images, labels = probes.column("image").to_pylist(), probes.column("label").to_numpy()
    tmp, ids = service["tmp"], np.arange(len(images)) + 10_000
    for name, uri in (("old", service["old_uri"]), ("new", service["new_uri"])):
        write_table(embedding_table(ids, _embed(uri, images), extra={"label": labels}), str(tmp / f"probes-{name}"))
    gallery = service["table"]
    write_table(
        embedding_table(
            service["ids"],
            np.zeros((len(service["ids"]), 2), np.float32),
            extra={"label": gallery.column("label").to_numpy()},
        ),
        str(tmp / "gallery-labels"),
    )
    common = ["eval", "live", "--probes-old", str(tmp / "probes-old"), "--probes-new", str(tmp / "probes-new")]
    common += ["--gallery-labels", str(tmp / "gallery-labels"), "--k", "5", "--json"]
    assert main([*common, "--name", service["img_index"]]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert main([*common, "--url", service["img"].url]) == 0
    over_http = json.loads(capsys.readouterr().out)
    assert over_http["probes"] == direct["probes"] == len(images)
    assert over_http["top1"] == direct["top1"] and over_http["map_at_k"] == pytest.approx(direct["map_at_k"])


def test_the_demo_online_phase_queries_through_the_service(service, tmp_path):
    from raybackfill.demo.configs import DemoConfig, DemoScale, Fit, OnlineConfig
    from raybackfill.demo.online import run_online
    from raybackfill.demo.pipeline import run_demo

    class CountingClient(ServiceClient):
        searches = 0

        def search(self, body: dict) -> dict:
            CountingClient.searches += 1
            return super().search(body)

    one = Fit(epochs=1, batch_size=32, lr=1e-3)
    tiny = DemoScale(
        classes=4, per_class=10, image_size=16, width=4, embedding_dim=8, side_info_dim=4, old=one, new=one,
        side_info=one, transformation=one, reverse=one, hidden_dim=8, mixer_dim=16, beta_points=3, backbone_lrs=(1e-3,),
    )  # fmt: skip
    config = DemoConfig(out=str(tmp_path / "demo"), scale=tiny, old_classes="0-1", seed=1, require_learning=False)
    online = OnlineConfig(max_probes=8, pause_s=0.0, tiers=2, min_seconds=3.0, batch_size=3)
    client = CountingClient(service["base"] + "/demo")
    report = run_demo(config, online=lambda artifacts: run_online(artifacts, online, service=client))
    section = report["online"]
    assert section["queried_through"] == "http"
    assert section["query_errors"] == 0 and section["queries"] > 0 and section["live_readings"]
    assert CountingClient.searches >= 2 + len(section["live_readings"])  # before, after, and every reading


def _doc_curls() -> list[str]:
    """Every curl line of the README and of the HTTP section of docs/operations.md."""
    text = (ROOT / "docs" / "operations.md").read_text()
    sections = [text[text.index("## HTTP search service") :], (ROOT / "README.md").read_text()]
    blocks = [block for section in sections for block in re.findall(r"```bash\n(.*?)```", section, re.S)]
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line.strip() for line in lines if line.strip().startswith("curl ")]


def test_the_documented_curl_examples_work_as_written(service):
    curls = _doc_curls()
    assert len(curls) >= 3
    workdir = service["tmp"] / "curl"
    workdir.mkdir(exist_ok=True)
    for name in ("query.png", "query.jpg"):  # the docs' file names; the service reads the format from the bytes
        (workdir / name).write_bytes(service["images"][5])
    env = {**os.environ, "RAYBACKFILL_API_KEY": API_KEY}
    for command in curls:
        # The docs serve one index at 127.0.0.1:8000; here the text examples go to the text app, the rest to images.
        app = "txt" if '"text"' in command else "img"
        command = command.replace("http://127.0.0.1:8000", f"{service['base']}/{app}")
        done = subprocess.run(
            ["bash", "-c", command + " --fail-with-body"], cwd=workdir, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        answer = json.loads(done.stdout)
        assert "results" in answer or "phase" in answer, answer


def test_raybackfill_serve_http_deploys_the_service_with_its_flags(service, capsys, monkeypatch):
    from ray import serve

    from raybackfill.cli.main import main
    from raybackfill.service.app import APP_NAME

    argv = ["serve", "--http", "--name", service["img_index"], "--port", str(service["port"])]
    argv += ["--old-model", service["old_uri"], "--new-model", service["new_uri"], "--api-key-env", "RB_TEST_API_KEY"]
    argv += ["--min-replicas", "1", "--max-replicas", "1", "--replica-cpus", "0", "--serving-nice", "3"]
    monkeypatch.delenv("RB_TEST_API_KEY", raising=False)
    assert main(argv) == 2  # the key's variable is unset: refused before anything is deployed
    assert "RB_TEST_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("RB_TEST_API_KEY", API_KEY)
    try:
        assert main(argv) == 0
        assert f"at {service['base']}" in capsys.readouterr().out
        image = service["images"][5]
        answer = ServiceClient(service["base"], api_key=API_KEY).search_image(image, k=K)
        reference = service["img"].search_image(image, k=K)["results"]  # the fixture's app over the same index
        _same(answer, [[(h["id"], h["score"], h["space"], h["model"]) for h in hits] for hits in reference])
        with pytest.raises(ServiceHTTPError) as err:
            ServiceClient(service["base"]).search_image(image, k=K)
        assert err.value.status == 401
        # Replicas start where the flag says (Ray's workers start at 15), the fixture's at the default 0.
        assert _replica_nice_values(APP_NAME) == [3]
        assert _replica_nice_values(service["img_app"]) == [0]
    finally:
        serve.delete(APP_NAME)


def _replica_nice_values(app: str) -> list[int]:
    """The nice value of each replica process of ``app`` on this machine (Ray titles them ray::ServeReplica:...)."""
    title = f"ray::ServeReplica:{app}:".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(title):
                found.append(os.getpriority(os.PRIO_PROCESS, int(pid)))
    return found


def test_request_counts_latencies_and_errors_reach_rays_prometheus_export(service):
    """Ray exports ray.util.metrics on each node's metrics port (prefixed ``ray_``) every few seconds: poll it
    until every replica's series are there (or a deadline passes, and the assertions say what is missing)."""
    import time

    port = ray._private.worker.global_worker.node.metrics_export_port

    def series() -> tuple[list[str], list[str], list[str]]:
        lines = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode().splitlines()
        return tuple(  # type: ignore[return-value]
            [line for line in lines if line.startswith(f"ray_raybackfill_http_{name}{{")]
            for name in ("requests_total", "errors_total", "request_seconds_bucket")
        )

    def complete(requests, errors, buckets) -> bool:
        search = [line for line in requests if 'route="/search"' in line]
        return (
            any('status="200"' in line for line in search)
            and any('status="400"' in line for line in search)
            and any('type="bad_request"' in line for line in errors)
            and any('type="unauthorized"' in line for line in errors)
            and any('route="/search"' in line for line in buckets)
        )

    deadline = time.monotonic() + 120
    found = series()
    while not complete(*found) and time.monotonic() < deadline:
        time.sleep(1)
        found = series()
    assert complete(*found), found


def test_a_shard_outage_is_a_503_with_retry_after_never_a_short_answer(service):
    """Last in the module: the text index's shard is killed for good."""
    shard = ray.get_actor(f"{service['txt_index']}-shard-000", namespace=NAMESPACE)
    ray.kill(shard, no_restart=True)
    url = service["txt"].url + "/search"
    for _ in range(3):
        status, headers, text = _raw(url, json.dumps({"text": "a sleepy grey cat", "k": 5}).encode(), key=API_KEY)
        assert status == 503, text
        assert json.loads(text)["error"]["type"] == "index_unavailable"
        assert int(headers["Retry-After"]) >= 1
    request = urllib.request.Request(service["txt"].url + "/healthz")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=60)
    assert err.value.code == 503 and int(err.value.headers["Retry-After"]) >= 1


def test_the_service_answers_across_promote_rollback_and_promote_with_each_generations_versions(service):
    """A service deployed for a v1 -> v2 upgrade keeps answering, unchanged, when v2 is promoted to the serving
    generation and when the promote is rolled back: the hits' model follows the generation that serves them."""
    from ray import serve

    from raybackfill.service.app import build_app

    tag = uuid.uuid4().hex[:6]
    name, app = f"svc-life-{tag}", f"life-{tag}"
    images, ids = service["images"], service["ids"]
    router = create_index(RouterConfig(name=name, shards=2, shard_num_cpus=0))
    try:
        get(router.load_old.remote(ids, _embed(service["old_uri"], images), "v1"))
        get(router.upsert.remote(ids, _embed(service["new_uri"], images), Space.NEW, "v2"))
        get(router.set_phase.remote("done"))
        config = {"index": name, "old_model": service["old_uri"], "new_model": service["new_uri"], "status_ttl_s": 0}
        serve.run(
            build_app({**config, "min_replicas": 1, "max_replicas": 1, "num_cpus": 0}), name=app, route_prefix="/life"
        )
        client = ServiceClient(f"{service['base']}/life")
        image = images[3]
        q_new = _embed(service["new_uri"], [image])
        done = client.search_image(image, k=K)
        assert (done["phase"], done["strategy"]) == ("done", "compatible")
        _same(done, _router_hits(router, None, q_new, K, Strategy.COMPATIBLE, VERSIONS))

        get(router.promote.remote())
        promoted = client.search_image(image, k=K)
        assert (promoted["phase"], promoted["strategy"]) == ("promoted", "compatible")
        v2_serving = {Space.OLD: "v2", Space.TRANSFORMED: "v2", Space.NEW: "v2"}
        _same(promoted, _router_hits(router, None, q_new, K, Strategy.COMPATIBLE, v2_serving))
        assert [h["id"] for h in promoted["results"][0]] == [h["id"] for h in done["results"][0]]
        assert {(h["space"], h["model"]) for h in promoted["results"][0]} == {("old", "v2")}

        get(router.rollback.remote())
        back = client.search_image(image, k=K)
        assert back["phase"] == "done"
        _same(back, _router_hits(router, None, q_new, K, Strategy.COMPATIBLE, VERSIONS))
    finally:
        serve.delete(app)
        destroy_index(name)
