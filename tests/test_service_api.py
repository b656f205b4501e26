"""The HTTP service's pure parts, without Ray Serve: request validation, the phase -> strategy table, the
configuration (args), redaction, the client's conversion back to router arrays, the device and GPU plumbing,
and raw queries embedded through old/new encoders and psi."""

from __future__ import annotations

import base64
import hashlib

import numpy as np
import pytest
import torch

from raybackfill.data.images import encode_png
from raybackfill.data.preprocessing import ImagePreprocessing
from raybackfill.index.merge import TopK
from raybackfill.index.serving import serving_strategy
from raybackfill.models.artifacts import ModelSpec, save_model
from raybackfill.models.backbones import small_cnn
from raybackfill.models.transformations import ReverseTransformation, apply_transformation
from raybackfill.service.api import (
    ServiceError,
    hits_json,
    parse_params,
    parse_search,
    redact,
    resolve_vectors,
)
from raybackfill.service.client import as_topk
from raybackfill.service.config import ServiceConfig
from raybackfill.service.queries import EncoderMismatchError, MissingEncoderError, QueryEncoders
from raybackfill.types import Phase, Space, Strategy


# --------------------------------------------------------------------------- phase -> strategy
@pytest.mark.parametrize(
    ("phase", "during", "expected"),
    [
        ("idle", "rank_merge", "old"),
        ("rolled_back", "compatible", "old"),
        ("instant", "compatible", "compatible"),
        ("backfill", "rank_merge", "rank_merge"),
        ("paused", "old", "old"),
        ("done", "rank_merge", "compatible"),
        ("promoted", "rank_merge", "compatible"),
    ],
)
def test_each_phase_is_served_by_its_strategy(phase, during, expected):
    assert serving_strategy(phase, during) == Strategy(expected)


def test_every_phase_has_a_strategy():
    assert {serving_strategy(p) for p in Phase} == set(Strategy)


# --------------------------------------------------------------------------- requests
def _field(payload, max_queries: int = 8) -> str | None:
    with pytest.raises(ServiceError) as err:
        parse_search(payload, max_queries=max_queries)
    assert err.value.status == 400
    assert err.value.field is not None and err.value.message.startswith(f"{err.value.field}:")
    return err.value.field


def test_a_search_body_is_validated_field_by_field():
    png = base64.b64encode(b"\x89PNG fake but base64").decode()
    assert _field([1, 2]) == "body"
    assert _field({"image": png, "k": 0}) == "k"
    assert _field({"image": png, "k": "ten"}) == "k"
    assert _field({"image": png, "extra": 1}) == "extra"
    assert _field({"image": png, "text": "x"}) == "query"
    assert _field({"k": 3}) == "query"
    assert _field({"image": "%%%"}) == "image"
    assert _field({"image": [png, "%%%"]}) == "image[1]"
    assert _field({"image": []}) == "image"
    assert _field({"text": ["a"] * 9}) == "text"  # over max_queries
    assert _field({"vector": []}) == "vector"
    assert _field({"vector": [[1.0, 2.0], [1.0]]}) == "vector"
    assert _field({"vector": [1.0, float("nan")]}) == "vector"
    assert _field({"vectors": {"old": [[1.0]], "new": [[1.0], [2.0]]}}) == "vectors"
    assert _field({"vectors": {"older": [1.0]}}) == "vectors"
    assert _field({"image": png, "strategy": "best"}) == "strategy"
    assert _field({"image": png, "params": {"nprobe": "8"}}) == "params.nprobe"
    assert _field({"image": png, "params": [1]}) == "params"
    assert _field({"image": png, "params": {"nprobe": True}}) == "params.nprobe"


def test_a_valid_search_body_parses_into_contents_or_vectors():
    data_url = "data:image/png;base64," + base64.b64encode(b"abc").decode()
    assert parse_search({"image": data_url}, max_queries=8).contents == [b"abc"]
    request = parse_search({"image": base64.b64encode(b"abc").decode(), "k": 3}, max_queries=8)
    assert request.contents == [b"abc"] and request.k == 3 and request.strategy is None and request.params is None
    texts = parse_search({"text": ["a", "b"], "strategy": "old", "params": {"nprobe": 4}}, max_queries=8)
    assert texts.contents == ["a", "b"] and texts.strategy is Strategy.OLD and texts.params == {"nprobe": 4}
    both = parse_search({"vectors": {"old": [1.0, 0.0], "new": [[0.0, 1.0]]}}, max_queries=8)
    q_old, q_new = resolve_vectors(both, Strategy.RANK_MERGE)
    np.testing.assert_array_equal(q_old, [[1.0, 0.0]])
    np.testing.assert_array_equal(q_new, [[0.0, 1.0]])
    assert resolve_vectors(both, Strategy.OLD)[1] is None


def test_a_bare_vector_goes_to_the_space_the_strategy_queries():
    request = parse_search({"vector": [[1.0, 2.0], [3.0, 4.0]]}, max_queries=8)
    q_old, q_new = resolve_vectors(request, Strategy.OLD)
    assert q_new is None and q_old.shape == (2, 2)
    q_old, q_new = resolve_vectors(request, Strategy.COMPATIBLE)
    assert q_old is None and q_new.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    with pytest.raises(ServiceError, match="rank_merge needs two queries") as err:
        resolve_vectors(request, Strategy.RANK_MERGE)
    assert err.value.field == "vector"
    only_old = parse_search({"vectors": {"old": [1.0]}}, max_queries=8)
    with pytest.raises(ServiceError) as err:
        resolve_vectors(only_old, Strategy.COMPATIBLE)
    assert err.value.field == "vectors.new"


def test_params_are_names_to_finite_numbers():
    assert parse_params(None) is None
    assert parse_params({"nprobe": 8, "efSearch": 64.0}) == {"nprobe": 8, "efSearch": 64.0}
    for bad in ({"nprobe": float("inf")}, {"nprobe": None}, {"": 1}, [("nprobe", 1)]):
        with pytest.raises(ServiceError):
            parse_params(bad)


def test_errors_carry_status_type_field_and_retry_after():
    err = ServiceError(503, "index_unavailable", "down", retry_after=1.2)
    assert err.body() == {"error": {"type": "index_unavailable", "message": "down"}}
    assert err.headers() == {"Retry-After": "2"}
    assert ServiceError(400, "bad_request", "k: no", field="k").body()["error"]["field"] == "k"


def test_redact_removes_every_secret_longest_first():
    message = "cannot read s3://bucket/models/new/model.json with key AKIA1234 (under s3://bucket/models)"
    out = redact(message, ["s3://bucket/models", "s3://bucket/models/new", "AKIA1234", "", "ab"])
    assert out == "cannot read <redacted>/model.json with key <redacted> (under <redacted>)"


# --------------------------------------------------------------------------- answers
def test_hits_carry_the_space_and_the_model_version_and_round_trip_to_router_arrays():
    top = TopK(
        np.array([[7, 3, -1]], dtype=np.int64),
        np.array([[0.9, 0.5, -np.inf]], dtype=np.float32),
        np.array([[Space.NEW.code, Space.OLD.code, 0]], dtype=np.int8),
    )
    status = {"old_space": {"version": "v1", "dim": 4}, "new_space": {"version": "v2", "dim": 8}}
    hits = hits_json(top, status)
    assert hits == [
        [
            {"id": 7, "score": pytest.approx(0.9), "space": "new", "model": "v2"},
            {"id": 3, "score": pytest.approx(0.5), "space": "old", "model": "v1"},
        ]
    ]
    back = as_topk(hits, 3)
    np.testing.assert_array_equal(back.ids, top.ids)
    np.testing.assert_array_equal(back.spaces, top.spaces)
    np.testing.assert_allclose(back.scores, top.scores)


# --------------------------------------------------------------------------- configuration
def test_service_args_round_trip_and_refuse_unknown_keys_and_bad_values(monkeypatch):
    config = ServiceConfig(index="idx", new_model="m/new", method="bct", trust_entrypoints=["pkg.mod:make"])
    assert ServiceConfig.from_args(config.to_args()) == config
    assert config.to_args()["method"] == "bct"
    with pytest.raises(ValueError, match=r"unknown service args \['new_modle'\]"):
        ServiceConfig.from_args({"new_modle": "x"})
    as_text = ServiceConfig.from_args(
        {"max_replicas": "6", "num_gpus": "0.5", "trust_all_entrypoints": "true", "image_size": "none",
         "trust_entrypoints": "a.b:c, d.e:f", "method": "rank_merge_psi", "psi_model": "m/psi"}
    )  # fmt: skip  # what `serve run raybackfill.service.app:build_app key=value ...` passes
    assert (as_text.max_replicas, as_text.num_gpus, as_text.trust_all_entrypoints) == (6, 0.5, True)
    assert as_text.image_size is None and as_text.trust_entrypoints == ("a.b:c", "d.e:f")
    assert as_text.method == "rank_merge_psi" and as_text.psi_model == "m/psi"
    with pytest.raises(ValueError, match="service arg max_k: 'many' is not a int"):
        ServiceConfig.from_args({"max_k": "many"})
    with pytest.raises(ValueError, match="service arg trust_all_entrypoints"):
        ServiceConfig.from_args({"trust_all_entrypoints": "maybe"})
    for bad in ({"device": "tpu"}, {"max_replicas": 0}, {"min_replicas": 3, "max_replicas": 2}, {"num_gpus": -1}):
        with pytest.raises(ValueError):
            ServiceConfig(**bad)
    for nice in (-1, 20, 1.5):
        with pytest.raises(ValueError, match="serving_nice"):
            ServiceConfig(serving_nice=nice)
    assert ServiceConfig.from_args({"serving_nice": "7"}).serving_nice == 7
    with pytest.raises(ValueError, match="64 hex digits"):
        ServiceConfig(api_key_sha256="abc")
    digest = hashlib.sha256(b"s3cret").hexdigest()
    assert ServiceConfig(api_key_sha256=digest.upper()).api_key_digest() == hashlib.sha256(b"s3cret").digest()
    monkeypatch.delenv("RB_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="unset or empty"):
        ServiceConfig(api_key_env="RB_TEST_KEY").api_key_digest()
    monkeypatch.setenv("RB_TEST_KEY", "s3cret")
    assert ServiceConfig(api_key_env="RB_TEST_KEY").api_key_digest() == hashlib.sha256(b"s3cret").digest()
    assert "s3cret" in ServiceConfig(api_key_env="RB_TEST_KEY").secrets()
    assert ServiceConfig().api_key_digest() is None


def test_replicas_get_gpus_and_autoscaling_from_the_config_and_pick_cuda_only_with_a_gpu(monkeypatch):
    import ray

    from raybackfill.service import app

    options = app.deployment_options(
        ServiceConfig(num_gpus=1, min_replicas=2, max_replicas=6, num_cpus=2, serving_nice=5)
    )
    assert options["ray_actor_options"] == {
        "num_cpus": 2,
        "num_gpus": 1,
        "runtime_env": {"env_vars": {"RAY_worker_niceness": "5"}},
    }
    assert options["autoscaling_config"]["min_replicas"] == 2 and options["autoscaling_config"]["max_replicas"] == 6
    assert app.resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    assert app.resolve_device("auto") == "cuda"
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])  # a replica Ray gave no GPU stays on the CPU
    assert app.resolve_device("auto") == "cpu"


# --------------------------------------------------------------------------- raw queries through encoders
def _cnn(path, version: str, seed: int) -> str:
    torch.manual_seed(seed)
    kwargs = {"embedding_dim": 6, "num_classes": 3, "width": 4}
    spec = ModelSpec("small_cnn", version, kwargs=kwargs, preprocessing=ImagePreprocessing(crop=8).to_dict())
    save_model(small_cnn(**kwargs).eval(), str(path), spec)
    return str(path)


def test_psi_makes_the_old_query_from_the_new_encoder_and_bad_rows_fail_alone(tmp_path):
    new_uri = _cnn(tmp_path / "new", "v2", 0)
    torch.manual_seed(1)
    psi = ReverseTransformation(new_dim=6, old_dim=4, hidden_dim=8).eval()
    save_model(
        psi,
        str(tmp_path / "psi"),
        ModelSpec("reverse_transformation", "psi-1", kwargs={"new_dim": 6, "old_dim": 4, "hidden_dim": 8}),
    )
    encoders = QueryEncoders.load(new=new_uri, psi=str(tmp_path / "psi"))
    assert encoders.query_spaces == (Space.OLD, Space.NEW) and encoders.missing(Strategy.RANK_MERGE) == ()

    rng = np.random.default_rng(0)
    images = [encode_png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(2)]
    embedded = encoders.embed([images[0], b"not an image", images[1]], Strategy.RANK_MERGE)
    assert list(embedded.failed) == [1] and "corrupt image bytes" in embedded.failed[1]
    q_old, q_new = embedded.rows([0, 2])
    expected_new = QueryEncoders.load(new=new_uri).embed(images, Strategy.COMPATIBLE).new
    np.testing.assert_allclose(q_new, expected_new, rtol=1e-5, atol=1e-6)
    expected_old, _ = apply_transformation(psi, expected_new)
    np.testing.assert_allclose(q_old, expected_old, rtol=1e-5, atol=1e-6)

    encoders.check_index({"old_space": {"version": "v1", "dim": 4}, "new_space": {"version": "v2", "dim": 6}})
    with pytest.raises(EncoderMismatchError, match="maps to dim 4"):
        encoders.check_index({"old_space": {"version": "v1", "dim": 5}, "new_space": None})
    with pytest.raises(EncoderMismatchError, match="holds model 'v3'"):
        encoders.check_index({"old_space": None, "new_space": {"version": "v3", "dim": 6}})


def test_a_strategy_without_its_encoder_and_a_text_to_an_image_model_are_refused(tmp_path):
    old_only = QueryEncoders.load(old=_cnn(tmp_path / "old", "v1", 2))
    assert old_only.missing(Strategy.COMPATIBLE) == (Space.NEW,)
    with pytest.raises(MissingEncoderError, match="needs an encoder for the new space"):
        old_only.embed([b"x"], Strategy.RANK_MERGE)
    embedded = old_only.embed(["a text"], Strategy.OLD)
    assert embedded.failed == {0: "this image encoder cannot embed a text"}
    with pytest.raises(ValueError, match="needs the new encoder"):
        QueryEncoders(psi=torch.nn.Linear(2, 2))
