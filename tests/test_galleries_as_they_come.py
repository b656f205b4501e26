"""A user's own gallery and models, end to end from the command line: a photo folder of every size and mode
(one corrupt file) and a torchvision network with their weights; a text gallery and a text encoder queried
with --text. Plus the device plumbing of the embedding actors, checked without a GPU."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from real_data import write_mixed_image_folder
from safetensors.torch import save_file
from torchvision import transforms as T

from raybackfill.cli.main import main
from raybackfill.data import storage
from raybackfill.data.schema import ID, vectors_of

TRUST_TEXT = "encoder_plugins:make_text_encoder"


@pytest.mark.slow
def test_a_real_world_photo_folder_imports_and_embeds_with_exactly_the_corrupt_file_quarantined(
    ray_cluster, tmp_path, capsys
):
    import torchvision

    folder = write_mixed_image_folder(tmp_path / "photos")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=4).eval()
    save_file(net.state_dict(), str(tmp_path / "team-resnet18.safetensors"))
    gallery, encoder, out = str(tmp_path / "gallery"), str(tmp_path / "team-v1"), str(tmp_path / "emb")

    assert main(["data", "import", "imagefolder", str(folder["root"]), "--out", gallery]) == 0
    assert (
        main(
            [
                "encoder",
                "register",
                "--kind",
                "torchvision",
                "--architecture",
                "resnet18",
                "--file",
                str(tmp_path / "team-resnet18.safetensors"),
                "--kwargs",
                '{"num_classes": 4}',
                "--resize",
                "40",
                "--crop",
                "32",
                "--mean",
                "0.485",
                "0.456",
                "0.406",
                "--std",
                "0.229",
                "0.224",
                "0.225",
                "--interpolation",
                "bilinear",
                "--version",
                "team-v1",
                "--out",
                encoder,
            ]
        )
        == 0
    )
    assert main(["embed", "--gallery", gallery, "--model", encoder, "--out", out, "--batch-size", "4"]) == 0
    capsys.readouterr()

    imported = storage.read_table(storage.join(gallery, "_quarantine")).to_pydict()
    assert imported[ID] == [folder["corrupt_id"]] and folder["corrupt"] in imported["reason"][0]
    quarantine = storage.join(out, "_quarantine")
    assert not storage.exists(quarantine) or storage.read_table(quarantine).num_rows == 0
    table = storage.read_table(out).sort_by(ID)
    paths = dict(zip(*storage.read_table(gallery, columns=[ID, "path"]).to_pydict().values(), strict=True))
    assert [paths[i] for i in table.column(ID).to_pylist()] == folder["good"]  # every good file, once

    # The same network called here on the original files, prepared by torchvision's own transforms.
    transform = T.Compose(
        [
            T.Resize(40, interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(32),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    pixels = torch.stack([transform(_upright_rgb((folder["root"] / rel).read_bytes())) for rel in folder["good"]])
    with torch.inference_mode():
        x = net.maxpool(net.relu(net.bn1(net.conv1(pixels))))
        expected = torch.flatten(net.avgpool(net.layer4(net.layer3(net.layer2(net.layer1(x))))), 1).numpy()
    np.testing.assert_allclose(vectors_of(table), expected, rtol=1e-4, atol=1e-5)


def _upright_rgb(data: bytes) -> Image.Image:
    """What a careful user's own loader does: EXIF orientation, then RGB. A 16-bit grey is scaled to 8 bits
    first, which raybackfill does too: PIL's ``convert`` alone would clip every value above 255 to white."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if image.mode == "I;16":
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8))
    return image.convert("RGB")


def test_a_text_gallery_is_embedded_served_and_queried_with_text(ray_cluster, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    rows = [
        {"id": 10 + i, "text": t, "label": "animal" if i % 2 else "vehicle"}
        for i, t in enumerate(
            [
                "red bicycle with a bell",
                "a sleepy grey cat",
                "blue electric car",
                "dog chasing a ball",
                "old steam train",
                "parrot on a branch",
            ]
        )
    ]
    blank = json.dumps({"id": 99, "text": "", "label": "animal"})
    corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n" + blank + "\n")
    gallery, encoder, out = str(tmp_path / "texts"), str(tmp_path / "text-v1"), str(tmp_path / "emb")
    name = f"rb-text-{tmp_path.name[-20:]}"

    assert main(["data", "import", "text", str(corpus), "--out", gallery]) == 0
    assert (
        main(
            [
                "encoder",
                "register",
                "--kind",
                "entrypoint",
                "--entrypoint",
                TRUST_TEXT,
                "--kwargs",
                '{"dim": 32}',
                "--text",
                "--version",
                "text-v1",
                "--out",
                encoder,
            ]
        )
        == 0
    )
    assert main(["embed", "--gallery", gallery, "--model", encoder, "--out", out]) == 2  # not trusted
    assert "--trust-entrypoint encoder_plugins:make_text_encoder" in capsys.readouterr().err
    trusted = ["--trust-entrypoint", TRUST_TEXT]
    assert main(["embed", "--gallery", gallery, "--model", encoder, "--out", out, *trusted]) == 0
    assert main(["serve", "--old-embeddings", out, "--name", name, "--shards", "2"]) == 0
    try:
        capsys.readouterr()
        assert (
            main(
                [
                    "query",
                    "--text",
                    "a sleepy grey cat",
                    "--model",
                    encoder,
                    "--strategy",
                    "old",
                    "--k",
                    "2",
                    "--json",
                    "--name",
                    name,
                    "--trust-entrypoint",
                    TRUST_TEXT,
                ]
            )
            == 0
        )
        hits = json.loads(capsys.readouterr().out)[0]
        assert hits[0]["id"] == 11 and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    finally:
        main(["stop", "--name", name])
    quarantine = storage.read_table(storage.join(gallery, "_quarantine")).to_pydict()
    assert quarantine[ID] == [99] and quarantine["reason"] == ["empty text"]


def test_the_embedding_actor_runs_its_encoder_and_every_input_on_the_device_it_was_given(tmp_path, monkeypatch):
    """GPU plumbing without a GPU: give the actor the "meta" device. The model and each input batch must move
    there (a CPU input reaching a meta model would raise a device mismatch in the forward pass instead), and the
    result is only unavailable at the final copy back to host memory, which meta tensors refuse."""
    import raybackfill.embed.actors as actors
    from raybackfill.data.preprocessing import ImagePreprocessing
    from raybackfill.models.artifacts import ModelSpec, save_model
    from raybackfill.models.registry import build_model

    kwargs = {"embedding_dim": 4, "num_classes": 2, "width": 4}
    save_model(
        build_model("small_cnn", **kwargs),
        str(tmp_path / "m"),
        ModelSpec("small_cnn", "v", kwargs, preprocessing=ImagePreprocessing(crop=8).to_dict()),
    )
    monkeypatch.setattr(actors, "actor_device", lambda: torch.device("meta"))
    actor = actors.EmbedRows({"embedding": str(tmp_path / "m")}, {"embedding": "pixels"})
    encoder = actor.encoders["embedding"]
    assert encoder.device.type == "meta" and {p.device.type for p in encoder.module.parameters()} == {"meta"}
    batch = {ID: np.arange(3), "pixels": np.zeros((3, 3, 8, 8), np.float32)}
    with pytest.raises(NotImplementedError, match="meta"):  # reached the copy back: the forward ran on meta
        actor(batch)


@pytest.mark.slow
def test_py_module_ships_an_entrypoint_package_to_the_workers_of_a_new_cluster(tmp_path):
    """`raybackfill embed --py-module PKG_DIR` from a directory where the package is not importable: Ray ships it
    to the embedding actors (runtime_env py_modules), in a cluster of its own (a child process)."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from raybackfill.data.preprocessing import TextPreprocessing
    from raybackfill.data.schema import text_table
    from raybackfill.encoders import EncoderSource, EntrypointTrust, register_encoder
    from raybackfill.types import EncoderKind

    package = tmp_path / "elsewhere" / "team_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "enc.py").write_text(Path(__file__).with_name("encoder_plugins.py").read_text())
    sys.path.insert(0, str(package.parent))
    try:
        register_encoder(
            EncoderSource(
                EncoderKind.ENTRYPOINT,
                "pkg-v1",
                entrypoint="team_pkg.enc:make_text_encoder",
                preprocessing=TextPreprocessing(),
            ),
            str(tmp_path / "enc"),
            trust=EntrypointTrust(("team_pkg.enc:make_text_encoder",)),
        )
    finally:
        sys.path.remove(str(package.parent))
        for name in [m for m in sys.modules if m.startswith("team_pkg")]:
            del sys.modules[name]
    storage.write_table(text_table([1, 2, 3], ["one fish", "two fish", "red fish"]), str(tmp_path / "texts"))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    ray_tmpdir = tempfile.mkdtemp(prefix="rbpm", dir="/tmp")  # short: unix socket paths are limited
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "raybackfill.cli.main",
            "embed",
            "--gallery",
            str(tmp_path / "texts"),
            "--model",
            str(tmp_path / "enc"),
            "--out",
            str(tmp_path / "emb"),
            "--py-module",
            str(package),
            "--trust-entrypoint",
            "team_pkg.enc:make_text_encoder",
        ],
        cwd=workdir,
        env={**env, "RAY_TMPDIR": ray_tmpdir, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    shutil.rmtree(ray_tmpdir, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert storage.read_table(str(tmp_path / "emb")).num_rows == 3
