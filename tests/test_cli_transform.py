"""`raybackfill transform`: embedding tables through FCT / FastFill h and psi, from the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raybackfill.cli.main import main
from raybackfill.cli.transform import transform_table
from raybackfill.data import storage
from raybackfill.data.schema import SchemaError, embedding_table, vectors_of
from raybackfill.embed.actors import TransformEmbeddings
from raybackfill.eval.metrics import evaluate
from raybackfill.models.artifacts import ModelSpec, load_model, save_model
from raybackfill.models.registry import build_model

N_GALLERY, N_QUERIES, OLD, NEW, SIDE, CLASSES = 40, 12, 6, 8, 3, 4


def save(root, name: str, architecture: str, method: str, **kwargs) -> str:
    """A freshly initialised transformation artefact (random weights are enough: the tests compare outputs)."""
    torch.manual_seed(len(name))
    uri = str(root / name)
    save_model(build_model(architecture, **kwargs).eval(), uri, ModelSpec(architecture, name, kwargs, method=method))
    return uri


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("transform-models")
    sizes = {"hidden_dim": 8, "mixer_dim": 8}
    return {
        "fct": save(root, "fct-v1", "forward_transformation", "fct", old_dim=OLD, new_dim=NEW, **sizes),
        "fastfill": save(
            root,
            "ff-v1",
            "fastfill_transformation",
            "fastfill_side_info",
            old_dim=OLD,
            new_dim=NEW,
            side_dim=SIDE,
            **sizes,
        ),
        "psi": save(root, "psi-v1", "reverse_transformation", "rank_merge_psi", new_dim=NEW, old_dim=OLD, hidden_dim=8),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Old (with side_info, label and the old model's tag, in two shards) and new embeddings of a labelled set."""
    root = tmp_path_factory.mktemp("transform-tables")
    rng = np.random.default_rng(3)
    centres = {space: rng.standard_normal((CLASSES, dim)) * 2 for space, dim in (("old", OLD), ("new", NEW))}
    out: dict = {}
    for who, n, first in (("gallery", N_GALLERY, 100), ("queries", N_QUERIES, 500)):
        ids = first + rng.permutation(n)
        labels = rng.integers(0, CLASSES, n).astype(np.int32)
        side = rng.standard_normal((n, SIDE)).astype(np.float32)
        for space, noise in (("old", 2.0), ("new", 0.7)):
            vectors = centres[space][labels] + noise * rng.standard_normal((n, centres[space].shape[1]))
            vectors = vectors.astype(np.float32)
            table = embedding_table(ids, vectors, side_info=side, model=f"{space}-model", extra={"label": labels})
            uri = str(root / f"{who}_{space}")
            storage.write_table(table, uri, rows_per_shard=n // 2 + 1)
            out[f"{who}_{space}"] = {"uri": uri, "ids": ids, "labels": labels, "vectors": vectors, "side": side}
    return out


def applied(uri: str, *inputs: np.ndarray):
    """The artefact's module applied directly to whole arrays (the reference the command must match)."""
    with torch.inference_mode():
        return load_model(uri).module(*(torch.from_numpy(x) for x in inputs))


def read_sorted(uri: str):
    table = storage.read_table(uri)
    return table.take(np.argsort(table.column("id").to_numpy()))


def by_id(entry: dict, values: np.ndarray) -> np.ndarray:
    return values[np.argsort(entry["ids"])]


def test_written_table_equals_the_transformation_applied_to_the_input(models, data, tmp_path, capsys):
    gallery, out = data["gallery_old"], str(tmp_path / "fct")
    assert (
        main(["transform", "--model", models["fct"], "--embeddings", gallery["uri"], "--out", out, "--batch-size", "7"])
        == 0
    )
    assert f"wrote {N_GALLERY} transformed embeddings to {out}" in capsys.readouterr().out

    table = read_sorted(out)
    assert table.schema.names == ["id", "embedding", "model", "label"]  # no side_info, no uncertainty
    assert all(s.rsplit("/", 1)[-1].startswith("part-") for s in storage.list_shards(out))
    np.testing.assert_array_equal(table.column("id").to_numpy(), np.sort(gallery["ids"]))
    expected = applied(models["fct"], gallery["vectors"]).numpy()
    np.testing.assert_allclose(vectors_of(table), by_id(gallery, expected), rtol=1e-5, atol=1e-6)
    assert set(table.column("model").to_pylist()) == {"fct-v1"}  # the transformation's tag, not the input's
    np.testing.assert_array_equal(table.column("label").to_numpy(), by_id(gallery, gallery["labels"]))


def test_fastfill_output_carries_an_uncertainty_column_equal_to_the_models_head(models, data, tmp_path):
    gallery, out = data["gallery_old"], str(tmp_path / "ff")
    transform_table(gallery["uri"], models["fastfill"], out, batch_size=16)

    table = read_sorted(out)
    h, s = applied(models["fastfill"], gallery["vectors"], gallery["side"])
    np.testing.assert_allclose(vectors_of(table), by_id(gallery, h.numpy()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(table.column("uncertainty").to_numpy(), by_id(gallery, s.numpy()), rtol=1e-5, atol=1e-6)


def test_the_command_writes_what_the_backfill_instant_phase_actor_computes(models, data, tmp_path):
    gallery, out = data["gallery_old"], str(tmp_path / "ff")
    transform_table(gallery["uri"], models["fastfill"], out)

    served = TransformEmbeddings(models["fastfill"])(storage.read_table(gallery["uri"]))  # the actor, outside Ray
    order = np.argsort(served["id"])
    table = read_sorted(out)
    np.testing.assert_array_equal(vectors_of(table), served["embedding"][order])
    np.testing.assert_array_equal(table.column("uncertainty").to_numpy(), served["uncertainty"][order])


def test_psi_maps_new_embeddings_into_the_old_dimension(models, data, tmp_path):
    queries, out = data["queries_new"], str(tmp_path / "psi")
    transform_table(queries["uri"], models["psi"], out)

    table = read_sorted(out)
    assert table.schema.field("embedding").type.list_size == OLD
    expected = applied(models["psi"], queries["vectors"]).numpy()
    np.testing.assert_allclose(vectors_of(table), by_id(queries, expected), rtol=1e-5, atol=1e-6)


def test_a_side_info_transformation_on_a_table_without_side_info_fails_naming_the_file_and_column(
    models, data, tmp_path, capsys
):
    bare = str(tmp_path / "bare")
    storage.write_table(embedding_table(np.arange(5), np.ones((5, OLD), np.float32)), bare)
    out = str(tmp_path / "out")
    with pytest.raises(SchemaError, match=r"part-00000\.parquet: missing column 'side_info'"):
        transform_table(bare, models["fastfill"], out)
    assert main(["transform", "--model", models["fastfill"], "--embeddings", bare, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "raybackfill transform: error:" in err and bare in err and "'side_info'" in err
    assert not storage.exists(out)


@pytest.mark.parametrize(
    ("ids", "vectors", "message"),
    [
        (np.arange(4), np.ones((4, NEW), np.float32), "column 'embedding' has dim 8, expected 6"),
        (
            np.arange(4),
            np.array([[1.0] * OLD, [np.nan] * OLD, [1.0] * OLD, [1.0] * OLD], np.float32),
            r"NaN/inf in 1 rows \(ids \[1\]\)",
        ),
        (np.array([0, 1, 1, 2]), np.ones((4, OLD), np.float32), "duplicate ids: 1"),
    ],
    ids=["wrong-dim", "nan-row", "duplicate-id"],
)
def test_a_bad_input_is_refused_naming_the_table_before_anything_is_written(models, tmp_path, ids, vectors, message):
    uri, out = str(tmp_path / "in"), str(tmp_path / "out")
    storage.write_table(embedding_table(ids, vectors), uri)
    with pytest.raises(SchemaError, match=message) as error:
        transform_table(uri, models["fct"], out)
    assert uri in str(error.value) and not storage.exists(out)


def test_an_existing_output_table_is_refused(models, data, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = ["transform", "--model", models["fct"], "--embeddings", data["gallery_old"]["uri"], "--out", out]
    assert main(argv) == 0
    shards = storage.list_shards(out)
    assert main(argv) == 2
    assert "already has 1 shard(s)" in capsys.readouterr().err and storage.list_shards(out) == shards


def test_outputs_are_the_gallery_transformed_and_psi_queries_of_eval_run(models, data, tmp_path):
    transformed, psi, report = (str(tmp_path / name) for name in ("gallery_fct", "queries_psi", "report"))
    assert (
        main(["transform", "--model", models["fct"], "--embeddings", data["gallery_old"]["uri"], "--out", transformed])
        == 0
    )
    assert main(["transform", "--model", models["psi"], "--embeddings", data["queries_new"]["uri"], "--out", psi]) == 0
    tables = [
        arg
        for name in ("queries_old", "queries_new", "gallery_old", "gallery_new")
        for arg in (f"--{name.replace('_', '-')}", data[name]["uri"])
    ]
    assert (
        main(
            [
                "eval",
                "run",
                *tables,
                "--gallery-transformed",
                transformed,
                "--psi-queries",
                psi,
                "--method",
                "fct",
                "--betas",
                "3",
                "--out",
                report,
            ]
        )
        == 0
    )

    anchors = json.loads((tmp_path / "report" / "report.json").read_text())["anchors"]
    # Rows of an old and a new table of the fixture share their order, which eval's id matching must recover.
    g, q = data["gallery_old"], data["queries_old"]
    expected = {
        "new_transformed": evaluate(
            data["queries_new"]["vectors"], applied(models["fct"], g["vectors"]).numpy(), q["labels"], g["labels"]
        ),
        "psi_old": evaluate(
            applied(models["psi"], data["queries_new"]["vectors"]).numpy(), g["vectors"], q["labels"], g["labels"]
        ),
    }
    for name, result in expected.items():
        assert anchors[name]["map"] == pytest.approx(result.map) and anchors[name]["top1"] == pytest.approx(result.top1)
