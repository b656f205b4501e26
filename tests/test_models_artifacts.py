"""Model artefacts: round trips (local and S3), never overwritten, no code execution, errors name the file."""

from __future__ import annotations

import json
import os

import pytest
import torch

from raybackfill.data.storage import StorageError, join, read_bytes, write_bytes
from raybackfill.models import artifacts
from raybackfill.models.artifacts import (
    ArtifactError,
    ArtifactExistsError,
    ModelSpec,
    load_model,
    read_spec,
    save_model,
)
from raybackfill.models.registry import build_model

CNN_KWARGS = {"embedding_dim": 8, "num_classes": 3, "width": 4}


@pytest.fixture(autouse=True)
def _seed():
    # Same random inputs on every run (conftest.py already pins torch to one thread for the session).
    torch.manual_seed(0)


def trained_cnn() -> torch.nn.Module:
    """A small CNN whose BatchNorm running statistics differ from a fresh one (they must round-trip)."""
    model = build_model("small_cnn", **CNN_KWARGS)
    model.train()(torch.randn(4, 3, 16, 16) * 3 + 1)
    return model.eval()


def cnn_spec(**overrides) -> ModelSpec:
    return ModelSpec(**{"architecture": "small_cnn", "version": "v1", "kwargs": CNN_KWARGS, **overrides})


def test_backbone_round_trip_gives_equal_outputs_and_full_spec(tmp_path):
    model = trained_cnn()
    uri = str(tmp_path / "models" / "old-v1")
    spec = cnn_spec(metric="l2", method="bct", training_data="s3://b/train", parent="old-v0")
    written = save_model(model, uri, spec)
    loaded = load_model(uri)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        for got, want in zip(loaded.module(images), model(images), strict=True):
            assert torch.equal(got, want)
    assert not loaded.module.training
    assert loaded.spec == written == read_spec(uri)
    assert written.dims == {"embedding": 8, "num_classes": 3}
    assert (written.metric, written.method, written.training_data, written.parent) == (
        "l2",
        "bct",
        "s3://b/train",
        "old-v0",
    )
    assert written.created is not None and written.created.endswith("+00:00")
    assert sorted(os.listdir(uri)) == ["model.json", "model.safetensors"]


def test_fastfill_transformation_round_trip(tmp_path):
    kwargs = {"old_dim": 4, "new_dim": 6, "side_dim": 2, "hidden_dim": 8, "mixer_dim": 8}
    model = build_model("fastfill_transformation", **kwargs).eval()
    spec = ModelSpec("fastfill_transformation", "t1", kwargs=kwargs, method="fastfill_side_info")
    save_model(model, str(tmp_path / "h"), spec)
    loaded = load_model(str(tmp_path / "h"))
    old, side = torch.randn(5, 4), torch.randn(5, 2)
    with torch.no_grad():
        for got, want in zip(loaded.module(old, side), model(old, side), strict=True):
            assert torch.equal(got, want)
    assert loaded.spec.dims == {"old": 4, "side": 2, "new": 6}


def test_a_backbone_has_a_linear_classifier_and_another_model_is_refused_by_name(tmp_path):
    save_model(trained_cnn(), str(tmp_path / "cnn"), cnn_spec())
    assert load_model(str(tmp_path / "cnn")).classifier.out_features == 3
    kwargs = {"old_dim": 4, "new_dim": 6, "side_dim": 2, "hidden_dim": 8, "mixer_dim": 8}
    head = build_model("fastfill_transformation", **kwargs).eval()
    save_model(head, str(tmp_path / "h"), ModelSpec("fastfill_transformation", "t1", kwargs=kwargs))
    with pytest.raises(ArtifactError, match=r"model 't1' \(fastfill_transformation\) has no linear classifier"):
        _ = load_model(str(tmp_path / "h")).classifier


def test_round_trip_on_s3(s3_bucket):
    model = trained_cnn()
    uri = f"{s3_bucket}/models/new-v2"
    save_model(model, uri, cnn_spec(version="v2"))
    loaded = load_model(uri)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.module.embed(images), model.embed(images))
    with pytest.raises(ArtifactExistsError):
        save_model(model, uri, cnn_spec(version="v2"))


def test_saving_over_an_existing_artefact_is_refused_and_keeps_it(tmp_path):
    uri = str(tmp_path / "m")
    save_model(trained_cnn(), uri, cnn_spec())
    before = {name: (tmp_path / "m" / name).read_bytes() for name in os.listdir(uri)}
    with pytest.raises(ArtifactExistsError, match="model.json: artefact already exists"):
        save_model(build_model("small_cnn", **CNN_KWARGS), uri, cnn_spec(version="v2"))
    assert {name: (tmp_path / "m" / name).read_bytes() for name in os.listdir(uri)} == before


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_a_concurrent_save_that_commits_first_wins_and_its_model_json_is_kept(storage, request, tmp_path, monkeypatch):
    root = str(tmp_path) if storage == "local" else request.getfixturevalue("s3_bucket")
    uri = join(root, "m")
    theirs = cnn_spec(version="theirs").to_json().encode()
    write_bytes(join(uri, "model.json"), theirs)
    # The other writer commits after our up-front check: only the final model.json write can notice it.
    monkeypatch.setattr(artifacts, "exists", lambda _uri: False)
    with pytest.raises(ArtifactExistsError, match="model.json: artefact already exists") as caught:
        save_model(trained_cnn(), uri, cnn_spec(version="ours"))
    assert caught.value.args[0].startswith(join(uri, "model.json"))
    assert read_bytes(join(uri, "model.json")) == theirs


def test_saving_a_module_that_the_spec_would_not_rebuild_is_refused(tmp_path):
    model = build_model("small_cnn", embedding_dim=16, num_classes=3, width=4)
    with pytest.raises(ArtifactError, match="does not match architecture 'small_cnn'"):
        save_model(model, str(tmp_path / "m"), cnn_spec())
    assert not (tmp_path / "m").exists()


class _Payload:
    """Unpickling this would create a file: the marker proves whether stored code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_spec(directory, **fields) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    raw = json.loads(cnn_spec().to_json())
    raw.update(fields)
    (directory / "model.json").write_text(json.dumps(raw))


def test_crafted_pickle_weights_are_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    write_spec(tmp_path / "m", weights="model.pt")
    torch.save({"trunk.0.0.weight": _Payload(str(marker))}, tmp_path / "m" / "model.pt")
    with pytest.raises(ArtifactError, match=r"model\.pt: refused"):
        load_model(str(tmp_path / "m"))
    assert not marker.exists()


def test_plain_tensor_pt_weights_load_through_weights_only(tmp_path):
    model = trained_cnn()
    write_spec(tmp_path / "m", weights="model.pt")
    torch.save(model.state_dict(), tmp_path / "m" / "model.pt")
    loaded = load_model(str(tmp_path / "m"))
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.module.embed(images), model.embed(images))


def test_truncated_weights_error_names_the_file(tmp_path):
    uri = str(tmp_path / "m")
    save_model(trained_cnn(), uri, cnn_spec())
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=r"m/model\.safetensors: not a readable safetensors file"):
        load_model(uri)


def test_weights_of_another_shape_error_names_the_file(tmp_path):
    uri = str(tmp_path / "m")
    save_model(trained_cnn(), uri, cnn_spec())
    spec = json.loads((tmp_path / "m" / "model.json").read_text())
    spec["kwargs"]["embedding_dim"] = 5
    (tmp_path / "m" / "model.json").write_text(json.dumps(spec))
    with pytest.raises(ArtifactError, match=r"model\.safetensors: weights do not match architecture"):
        load_model(uri)


def test_missing_weights_or_model_json_errors_name_the_file(tmp_path):
    write_spec(tmp_path / "no-weights")
    with pytest.raises(StorageError, match=r"no-weights/model\.safetensors: no such file"):
        load_model(str(tmp_path / "no-weights"))
    with pytest.raises(StorageError, match=r"empty/model\.json: no such file"):
        load_model(str(tmp_path / "empty"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"architecture": "small_cnn", "version": "v1"}', "unsupported format_version"),
        ('{"format_version": 1, "version": "v1"}', "missing keys"),
        ('{"format_version": 1, "architecture": "small_cnn", "version": "v1", "colour": 1}', "unknown keys"),
        ('{"format_version": 1, "architecture": "vgg", "version": "v1"}', "unknown architecture 'vgg'"),
        ('{"format_version": 1, "architecture": "small_cnn", "version": "v1", "metric": "dot"}', "metric"),
        ('{"format_version": 1, "architecture": "small_cnn", "version": "v1", "weights": "../x.pt"}', "weights"),
        ('{"format_version": 1, "architecture": "small_cnn", "version": "v1", "kwargs": {"depth": 3}}', "bad arg"),
    ],
)
def test_bad_model_json_errors_name_the_file(tmp_path, content, message):
    (tmp_path / "model.json").write_text(content)
    with pytest.raises(ArtifactError, match=message) as info:
        load_model(str(tmp_path))
    assert join(str(tmp_path), "model.json") in str(info.value)


def test_spec_validates_method_and_version():
    with pytest.raises(ArtifactError, match="unknown method 'magic'"):
        cnn_spec(method="magic")
    with pytest.raises(ArtifactError, match="version"):
        cnn_spec(version="")
