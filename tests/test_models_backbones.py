"""Backbones give (N, d) embeddings and logits; the registry rebuilds every architecture by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raybackfill.models.backbones import EmbeddingModel, resnet18, resnet50, small_cnn
from raybackfill.models.registry import BUILDERS, build_model


@pytest.fixture(autouse=True)
def _seed():
    # Same random inputs on every run (conftest.py already pins torch to one thread for the session).
    torch.manual_seed(0)


def test_small_cnn_embeds_32x32_images_and_classifies_them():
    model = small_cnn(embedding_dim=24, num_classes=7).eval()
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        embedding, logits = model(images)
        assert embedding.shape == (5, 24) and logits.shape == (5, 7)
        assert torch.equal(model.embed(images), embedding)
        assert torch.allclose(model.classifier(embedding), logits)
    assert model.dims == {"embedding": 24, "num_classes": 7}


@pytest.mark.parametrize("builder", [resnet18, resnet50])
def test_resnets_embed_32x32_images_with_configurable_dim(builder):
    model = builder(embedding_dim=16, num_classes=3, small_images=False).eval()
    with torch.no_grad():
        embedding, logits = model(torch.randn(2, 3, 32, 32))
    assert embedding.shape == (2, 16) and logits.shape == (2, 3)


def test_resnet_small_images_stem_keeps_resolution():
    model = resnet18(embedding_dim=8, num_classes=2, small_images=True)
    conv1 = model.trunk.conv1
    assert (conv1.kernel_size, conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(model.trunk.maxpool, nn.Identity)
    # the standard stem divides a 32x32 image by 4 before layer1; this one keeps 32x32
    shapes = []

    def record(module, inputs, output):
        shapes.append(tuple(output.shape))

    model.trunk.layer1.register_forward_hook(record)
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 32, 32))
    assert shapes == [(1, 64, 32, 32)]


def test_embedding_model_trains_end_to_end_on_cross_entropy():
    model = small_cnn(embedding_dim=8, num_classes=2, width=4)
    images = torch.randn(8, 3, 8, 8)
    labels = torch.tensor([0, 1] * 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        _, logits = model(images)
        loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_embedding_model_rejects_non_positive_dims():
    with pytest.raises(ValueError, match="positive"):
        EmbeddingModel(nn.Flatten(), 4, 0, 3)


def test_registry_builds_every_architecture_with_its_keyword_arguments():
    kwargs = {
        "small_cnn": {"embedding_dim": 8, "num_classes": 3, "width": 4},
        "resnet18": {"embedding_dim": 8, "num_classes": 3},
        "resnet50": {"embedding_dim": 8, "num_classes": 3, "small_images": False},
        "side_info_cnn": {"embedding_dim": 6},
        "forward_transformation": {"old_dim": 4, "new_dim": 8, "side_dim": 6},
        "fastfill_transformation": {"old_dim": 4, "new_dim": 8},
        "reverse_transformation": {"new_dim": 8, "old_dim": 4},
        "linear_forward": {"old_dim": 4, "new_dim": 8, "rank": 2},
        "linear_reverse": {"new_dim": 8, "old_dim": 4},
        "text_hashed_words": {"vocab_size": 64, "word_dim": 4, "embedding_dim": 6, "num_classes": 3},
        "text_char_ngrams": {"buckets": 64, "gram_dim": 4, "hidden_dim": 8, "embedding_dim": 6, "num_classes": 3},
    }
    assert set(kwargs) == set(BUILDERS)
    for name, args in kwargs.items():
        assert isinstance(build_model(name, **args), nn.Module)
    assert build_model("small_cnn", **kwargs["small_cnn"]).dims == {"embedding": 8, "num_classes": 3}


def test_registry_errors_list_valid_names_and_name_bad_arguments():
    with pytest.raises(ValueError, match="valid: .*small_cnn"):
        build_model("vgg16")
    with pytest.raises(ValueError, match="'small_cnn': bad arguments"):
        build_model("small_cnn", depth=3)
