"""Encoders of every kind (raybackfill/encoders): each one, loaded from its artefact and run through the Ray Data
actor pool, gives what the same model gives when called directly here; entrypoints never run untrusted."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import save_file
from torch import nn
from torchvision import transforms as T

from raybackfill.cli.main import main
from raybackfill.data import storage
from raybackfill.data.preprocessing import ImagePreprocessing, TextPreprocessing
from raybackfill.data.schema import EMBEDDING, ID, image_table, text_table, vectors_of
from raybackfill.embed.pipeline import PoolConfig, embed_gallery
from raybackfill.encoders import (
    EncoderSource,
    EntrypointTrust,
    UntrustedEntrypointError,
    load_encoder,
    register_encoder,
)
from raybackfill.models.artifacts import ArtifactError, ModelSpec, save_model
from raybackfill.models.registry import build_model
from raybackfill.types import EncoderKind

PREP = ImagePreprocessing(resize=20, crop=16, mean=(0.48, 0.46, 0.41), std=(0.23, 0.22, 0.23))
TEXT = TextPreprocessing(tokenizer="bytes", max_length=24)
TRUST = EntrypointTrust(("encoder_plugins:make_image_encoder", "encoder_plugins:make_text_encoder"))


def _png(pixels: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def gallery_images() -> list[bytes]:
    """Sizes, aspect ratios and modes a real gallery has."""
    rng = np.random.default_rng(3)
    rgb = [_png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((16, 16), (30, 17), (17, 41))]
    grey = _png(rng.integers(0, 256, (25, 25), dtype=np.uint8), mode="L")
    rgba = _png(rng.integers(0, 256, (22, 35, 4), dtype=np.uint8), mode="RGBA")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (28, 20, 3), dtype=np.uint8)).convert("CMYK").save(buf, format="JPEG")
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rng.integers(0, 256, (18, 40, 3), dtype=np.uint8)).save(rotated, format="JPEG", exif=exif)
    return [*rgb, grey, rgba, buf.getvalue(), rotated.getvalue()]


TEXTS = ["a red bicycle", "two cats on a mat", "Ünïcode wörds ok", "x", "the quick brown fox jumps over the dog"]


def reference_pixels(images: list[bytes], prep: ImagePreprocessing) -> torch.Tensor:
    """torchvision's own transforms on the upright RGB image: what a model trained with them expects."""
    transform = T.Compose(
        [
            T.Resize(prep.resize or prep.crop, interpolation=T.InterpolationMode(prep.interpolation)),
            T.CenterCrop(prep.crop),
            T.ToTensor(),
            T.Normalize(prep.mean, prep.std),
        ]
    )
    upright = [ImageOps.exif_transpose(Image.open(io.BytesIO(b))).convert("RGB") for b in images]
    return torch.stack([transform(img) for img in upright])


def reference_tokens(texts: list[str], length: int = TEXT.max_length) -> torch.Tensor:
    ids = torch.zeros((len(texts), length), dtype=torch.int64)
    for row, text in enumerate(texts):
        data = list(text.encode("utf-8"))[:length]
        ids[row, : len(data)] = torch.tensor(data) + 1
    return ids


class SmallConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.conv(x))).flatten(1)


class MeanTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(257, 10, padding_idx=0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens > 0).unsqueeze(-1).float()
        return (self.embedding(tokens) * mask).sum(1) / mask.sum(1).clamp(min=1.0)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[str, object]]:
    """name -> (artefact URI, the model called directly on reference inputs)."""
    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    out: dict[str, tuple[str, object]] = {}

    cnn_kwargs = {"embedding_dim": 8, "num_classes": 3, "width": 4}
    cnn = build_model("small_cnn", **cnn_kwargs).eval()
    spec = ModelSpec("small_cnn", "own-v1", cnn_kwargs, preprocessing=PREP.to_dict())
    save_model(cnn, str(root / "own"), spec)
    out["raybackfill"] = (str(root / "own"), lambda imgs: cnn.embed(reference_pixels(imgs, PREP)))

    conv = SmallConv().eval()
    torch.jit.trace(conv, torch.zeros(1, 3, 16, 16)).save(str(root / "conv.ts"))
    register_encoder(
        EncoderSource(EncoderKind.TORCHSCRIPT, "ts-v1", path=str(root / "conv.ts"), preprocessing=PREP),
        str(root / "ts"),
    )
    out["torchscript"] = (str(root / "ts"), lambda imgs: conv(reference_pixels(imgs, PREP)))

    batch = torch.export.Dim("batch")
    program = torch.export.export(conv, (torch.zeros(2, 3, 16, 16),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(root / "conv.pt2"))
    register_encoder(
        EncoderSource(EncoderKind.TORCH_EXPORT, "pt2-v1", path=str(root / "conv.pt2"), preprocessing=PREP),
        str(root / "pt2"),
    )
    out["torch_export"] = (str(root / "pt2"), lambda imgs: conv(reference_pixels(imgs, PREP)))

    import torchvision

    resnet = torchvision.models.resnet18(num_classes=5).eval()
    save_file(resnet.state_dict(), str(root / "resnet18.safetensors"))
    tv_prep = ImagePreprocessing(
        resize=36, crop=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bilinear"
    )
    register_encoder(
        EncoderSource(
            EncoderKind.TORCHVISION,
            "tv-v1",
            path=str(root / "resnet18.safetensors"),
            architecture="resnet18",
            kwargs={"num_classes": 5},
            preprocessing=tv_prep,
        ),
        str(root / "tv"),
    )

    def resnet_features(imgs):  # the penultimate layer, spelled out
        x = reference_pixels(imgs, tv_prep)
        r = resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        return torch.flatten(r.avgpool(r.layer4(r.layer3(r.layer2(r.layer1(x))))), 1)

    out["torchvision"] = (str(root / "tv"), resnet_features)

    from encoder_plugins import HashedBagOfWords, PixelProjection

    register_encoder(
        EncoderSource(
            EncoderKind.ENTRYPOINT,
            "ep-v1",
            entrypoint="encoder_plugins:make_image_encoder",
            kwargs={"dim": 12, "seed": 4},
            preprocessing=PREP,
        ),
        str(root / "ep"),
        trust=TRUST,
    )
    projection = PixelProjection(dim=12, seed=4)
    out["entrypoint"] = (str(root / "ep"), lambda imgs: projection(reference_pixels(imgs, PREP).numpy()))

    tokens = MeanTokens().eval()
    torch.jit.script(tokens).save(str(root / "text.ts"))
    register_encoder(
        EncoderSource(EncoderKind.TORCHSCRIPT, "text-ts-v1", path=str(root / "text.ts"), preprocessing=TEXT),
        str(root / "text-ts"),
    )
    out["text_torchscript"] = (str(root / "text-ts"), lambda texts: tokens(reference_tokens(texts)))
    program = torch.export.export(
        tokens, (torch.ones(2, TEXT.max_length, dtype=torch.int64),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, str(root / "text.pt2"))
    register_encoder(
        EncoderSource(EncoderKind.TORCH_EXPORT, "text-pt2-v1", path=str(root / "text.pt2"), preprocessing=TEXT),
        str(root / "text-pt2"),
    )
    out["text_torch_export"] = (str(root / "text-pt2"), lambda texts: tokens(reference_tokens(texts)))
    register_encoder(
        EncoderSource(
            EncoderKind.ENTRYPOINT,
            "text-ep-v1",
            entrypoint="encoder_plugins:make_text_encoder",
            kwargs={"dim": 16},
            preprocessing=TextPreprocessing(),
        ),
        str(root / "text-ep"),
        trust=TRUST,
    )
    bag = HashedBagOfWords(dim=16)
    out["text_entrypoint"] = (str(root / "text-ep"), lambda texts: np.asarray(bag.embed(texts)))
    return out


IMAGE_SOURCES = ["raybackfill", "torchscript", "torch_export", "torchvision", "entrypoint"]
TEXT_SOURCES = ["text_torchscript", "text_torch_export", "text_entrypoint"]


def _direct(fn, rows) -> np.ndarray:
    with torch.inference_mode():
        out = fn(rows)
    return out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out, dtype=np.float32)


@pytest.mark.parametrize("name", IMAGE_SOURCES + TEXT_SOURCES)
def test_each_encoder_kind_loaded_from_its_artefact_equals_the_model_called_directly(sources, name):
    uri, direct = sources[name]
    rows = TEXTS if name.startswith("text") else gallery_images()
    vectors, ok, reasons = load_encoder(uri, trust=TRUST).embed_rows(rows)
    assert ok.all() and reasons == []
    expected = _direct(direct, rows)
    assert vectors.dtype == np.float32 and vectors.shape == expected.shape
    np.testing.assert_allclose(vectors, expected, rtol=1e-4, atol=1e-5)


def test_registration_records_kind_version_preprocessing_and_the_measured_dimension(sources):
    specs = {name: json.loads(storage.read_bytes(storage.join(sources[name][0], "model.json"))) for name in sources}
    assert specs["torchvision"]["kind"] == "torchvision" and specs["torchvision"]["dims"] == {"embedding": 512}
    assert specs["torchvision"]["preprocessing"]["crop"] == 32
    assert specs["entrypoint"]["entrypoint"] == "encoder_plugins:make_image_encoder"
    assert specs["entrypoint"]["dims"] == {"embedding": 12} and specs["text_entrypoint"]["dims"] == {"embedding": 16}
    assert specs["text_torchscript"]["preprocessing"]["modality"] == "text"
    assert specs["torchscript"]["version"] == "ts-v1" and specs["torchscript"]["weights"] == "model.torchscript"


def test_a_torchvision_encoder_defaults_to_its_architectures_own_preset_and_a_named_layer(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(num_classes=3).eval()
    weights = tmp_path / "w.pt"
    torch.save(net.state_dict(), weights)  # a plain state dict, read back with weights_only=True
    spec = register_encoder(
        EncoderSource(
            EncoderKind.TORCHVISION,
            "tv",
            path=str(weights),
            architecture="resnet18",
            kwargs={"num_classes": 3},
            embedding_layer="layer4",
        ),
        str(tmp_path / "a"),
    )
    assert (spec.preprocessing["resize"], spec.preprocessing["crop"]) == (256, 224)
    assert spec.preprocessing["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert spec.dims == {"embedding": 512 * 7 * 7} and spec.weights == "model.pt"


def test_a_torchvision_layer_that_does_not_exist_is_named_at_registration(tmp_path):
    import torchvision

    save_file(torchvision.models.resnet18(num_classes=3).state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ArtifactError, match="has no layer 'layer9'"):
        register_encoder(
            EncoderSource(
                EncoderKind.TORCHVISION,
                "tv",
                path=str(tmp_path / "w.safetensors"),
                architecture="resnet18",
                kwargs={"num_classes": 3},
                embedding_layer="layer9",
                preprocessing=ImagePreprocessing(crop=32),
            ),
            str(tmp_path / "a"),
        )
    assert not (tmp_path / "a" / "model.json").exists()


@pytest.mark.parametrize("name", IMAGE_SOURCES)
def test_each_image_encoder_embeds_a_mixed_gallery_through_the_actor_pool_as_called_directly(
    ray_cluster, tmp_path, sources, name
):
    uri, direct = sources[name]
    images = gallery_images()
    ids = np.arange(100, 100 + len(images))
    storage.write_table(image_table(ids, images, labels=np.zeros(len(ids))), str(tmp_path / "g"), rows_per_shard=4)
    result = embed_gallery(
        str(tmp_path / "g"),
        {EMBEDDING: uri},
        str(tmp_path / "out"),
        pool=PoolConfig(batch_size=3),
        progress=False,
        trust=TRUST,
    )
    assert (result.rows, result.quarantined) == (len(images), 0)
    table = storage.read_table(str(tmp_path / "out")).sort_by(ID)
    assert table.column(ID).to_pylist() == ids.tolist()
    np.testing.assert_allclose(vectors_of(table), _direct(direct, images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", TEXT_SOURCES)
def test_each_text_encoder_embeds_a_text_gallery_through_the_actor_pool_as_called_directly(
    ray_cluster, tmp_path, sources, name
):
    uri, direct = sources[name]
    texts = [*TEXTS, "   "]  # a blank text: quarantined, not embedded
    ids = np.arange(len(texts)) * 7
    storage.write_table(text_table(ids, texts), str(tmp_path / "t"), rows_per_shard=3)
    result = embed_gallery(
        str(tmp_path / "t"),
        {EMBEDDING: uri},
        str(tmp_path / "out"),
        pool=PoolConfig(batch_size=2),
        progress=False,
        trust=TRUST,
    )
    assert (result.rows, result.quarantined) == (len(TEXTS), 1)
    table = storage.read_table(str(tmp_path / "out")).sort_by(ID)
    assert table.column(ID).to_pylist() == ids[:-1].tolist()
    np.testing.assert_allclose(vectors_of(table), _direct(direct, TEXTS), rtol=1e-4, atol=1e-5)
    quarantine = storage.read_table(str(tmp_path / "out" / "_quarantine"))
    assert quarantine.column(ID).to_pylist() == [ids[-1]] and quarantine.column("reason").to_pylist() == ["empty text"]


def test_an_image_encoder_is_refused_on_a_text_gallery_before_anything_is_written(ray_cluster, tmp_path, sources):
    storage.write_table(text_table([1, 2], ["a", "b"]), str(tmp_path / "t"))
    with pytest.raises(ValueError, match="an image encoder cannot embed .* whose rows hold 'text'"):
        embed_gallery(str(tmp_path / "t"), {EMBEDDING: sources["torchscript"][0]}, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- trust


def _entrypoint_artifact(root, entrypoint: str) -> str:
    """A model.json naming ``entrypoint``, written by hand as an attacker (or a careless colleague) would."""
    spec = ModelSpec(
        "", "v-ep", kind="entrypoint", entrypoint=entrypoint, preprocessing=PREP.to_dict(), dims={"embedding": 4}
    )
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.json").write_text(spec.to_json())
    return str(root)


def test_a_model_json_naming_an_entrypoint_is_refused_without_trust_and_imports_nothing(tmp_path):
    uri = _entrypoint_artifact(tmp_path / "m", "encoder_plugins_untrusted:make")
    for trust in (None, EntrypointTrust(), EntrypointTrust(("encoder_plugins:make_image_encoder",))):
        with pytest.raises(UntrustedEntrypointError, match="--trust-entrypoint encoder_plugins_untrusted:make"):
            load_encoder(uri, trust=trust)
    assert "encoder_plugins_untrusted" not in sys.modules
    # Trusted by name it runs (this factory then refuses to work, which proves it was called).
    with pytest.raises(AssertionError, match="an untrusted entrypoint ran"):
        load_encoder(uri, trust=EntrypointTrust(("encoder_plugins_untrusted:make",)))
    sys.modules.pop("encoder_plugins_untrusted", None)


def test_the_embed_and_backfill_commands_refuse_an_untrusted_entrypoint_before_anything_runs(tmp_path, capsys):
    uri = _entrypoint_artifact(tmp_path / "m", "os:system")
    storage.write_table(image_table([1], gallery_images()[:1]), str(tmp_path / "g"))
    storage.write_table(pa.table({"id": pa.array([1], pa.int64())}), str(tmp_path / "unused"))
    assert (
        main(
            [
                "embed",
                "--gallery",
                str(tmp_path / "g"),
                "--model",
                uri,
                "--out",
                str(tmp_path / "out"),
                "--address",
                "127.0.0.1:1",
            ]
        )
        == 2
    )  # refused before Ray is reached
    assert "names the entrypoint 'os:system'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            {"kind": "raybackfill", "entrypoint": "os:system"},
            "entrypoint is required for kind 'entrypoint' and allowed",
        ),
        ({"kind": "entrypoint", "entrypoint": "os.system; rm -rf /"}, "must look like 'package.module:factory'"),
        ({"kind": "pickle"}, "unknown kind 'pickle'"),
        ({"kind": "torchvision", "architecture": "not_a_net"}, "unknown torchvision architecture"),
    ],
)
def test_crafted_model_json_files_are_refused_with_a_reason(tmp_path, raw, message):
    fields = {"format_version": 1, "architecture": "small_cnn", "version": "v", **raw}
    (tmp_path / "model.json").write_text(json.dumps(fields))
    with pytest.raises(ArtifactError, match=message):
        load_encoder(str(tmp_path))


# --------------------------------------------------------------------------------------------------- CLI


def test_encoder_register_and_show_from_the_command_line(tmp_path, capsys):
    conv = SmallConv().eval()
    torch.jit.trace(conv, torch.zeros(1, 3, 16, 16)).save(str(tmp_path / "conv.ts"))
    out = str(tmp_path / "enc")
    assert (
        main(
            [
                "encoder",
                "register",
                "--kind",
                "torchscript",
                "--file",
                str(tmp_path / "conv.ts"),
                "--version",
                "cli-v1",
                "--crop",
                "16",
                "--resize",
                "18",
                "--out",
                out,
            ]
        )
        == 0
    )
    assert "registered torchscript encoder 'cli-v1'" in capsys.readouterr().out
    assert main(["encoder", "show", out]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["dims"] == {"embedding": 24} and shown["preprocessing"]["resize"] == 18
    assert (
        main(
            [
                "encoder",
                "register",
                "--kind",
                "torchscript",
                "--file",
                str(tmp_path / "conv.ts"),
                "--version",
                "x",
                "--out",
                str(tmp_path / "no-size"),
            ]
        )
        == 2
    )
    assert "--crop N" in capsys.readouterr().err


def test_torchvision_flags_replace_only_their_part_of_the_architectures_preset(tmp_path, capsys):
    import torchvision

    torch.manual_seed(0)
    save_file(torchvision.models.resnet18(num_classes=3).state_dict(), str(tmp_path / "r18.safetensors"))
    out = str(tmp_path / "r18")
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
                str(tmp_path / "r18.safetensors"),
                "--kwargs",
                '{"num_classes": 3}',
                "--crop",
                "32",
                "--resize",
                "36",
                "--version",
                "v2",
                "--out",
                out,
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["encoder", "show", out]) == 0
    shown = json.loads(capsys.readouterr().out)["preprocessing"]
    # ImageNet statistics and bilinear interpolation are resnet18's own; only the sizes were given.
    assert shown["crop"] == 32 and shown["resize"] == 36
    assert shown["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert shown["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert shown["interpolation"] == "bilinear"
