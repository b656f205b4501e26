"""Side-info model and its SimCLR augmentations (batched, torch only)."""

from __future__ import annotations

import pytest
import torch

from raybackfill.compat.losses import nt_xent_loss
from raybackfill.data.preprocessing import MEAN, STD
from raybackfill.models.side_info import AugmentConfig, SideInfoModel, augment

NO_JITTER = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "grayscale_p": 0.0}
FULL_VIEW = {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0)}


@pytest.fixture(autouse=True)
def _seed():
    # Same random inputs on every run (conftest.py already pins torch to one thread for the session).
    torch.manual_seed(0)


def normalised_images(n: int, size: int = 16) -> torch.Tensor:
    pixels = torch.rand(n, 3, size, size)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def pixels_of(images: torch.Tensor) -> torch.Tensor:
    return images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def test_side_info_model_gives_small_embedding_and_projection():
    model = SideInfoModel(embedding_dim=32, width=4, projection_dim=16).eval()
    images = normalised_images(3)
    with torch.no_grad():
        embedding, projection = model(images)
        assert torch.equal(model.embed(images), embedding)
    assert embedding.shape == (3, 32) and projection.shape == (3, 16)
    assert model.dims == {"embedding": 32}


def test_augment_without_crop_flip_or_jitter_is_the_identity():
    images = normalised_images(4)
    out = augment(images, AugmentConfig(flip_p=0.0, **FULL_VIEW, **NO_JITTER))
    assert torch.allclose(out, images, atol=1e-5)


def test_augment_flip_mirrors_images_horizontally():
    images = normalised_images(4)
    out = augment(images, AugmentConfig(flip_p=1.0, **FULL_VIEW, **NO_JITTER))
    assert torch.allclose(out, images.flip(-1), atol=1e-5)


def test_augment_grayscale_makes_channels_equal_in_pixel_space():
    out = pixels_of(augment(normalised_images(3), AugmentConfig(grayscale_p=1.0)))
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5) and torch.allclose(out[:, 1], out[:, 2], atol=1e-5)


def test_augment_draws_parameters_per_image_reproducibly_and_stays_in_pixel_range():
    image = normalised_images(1)
    batch = image.expand(6, -1, -1, -1).contiguous()
    first = augment(batch, generator=torch.Generator().manual_seed(7))
    again = augment(batch, generator=torch.Generator().manual_seed(7))
    assert first.shape == batch.shape and torch.equal(first, again)
    assert not torch.allclose(first[0], first[1])  # same image, different random views
    pixels = pixels_of(first)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_simclr_training_lowers_nt_xent_on_held_views():
    model = SideInfoModel(embedding_dim=8, width=4, projection_dim=8)
    # smooth images (random 2x2 colour layouts, upsampled): crops of one image share its colours
    layouts = torch.rand(16, 3, 2, 2)
    pixels = torch.nn.functional.interpolate(layouts, size=(12, 12), mode="bilinear", align_corners=False)
    images = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    held = torch.Generator().manual_seed(1)
    view1, view2 = augment(images, generator=held), augment(images, generator=held)

    def held_loss() -> float:
        model.eval()
        with torch.no_grad():
            return nt_xent_loss(model(view1)[1], model(view2)[1], tau=0.5).item()

    before = held_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(2)
    model.train()
    for _ in range(30):
        z1 = model(augment(images, generator=generator))[1]
        z2 = model(augment(images, generator=generator))[1]
        loss = nt_xent_loss(z1, z2, tau=0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert held_loss() < before - 0.15  # chance level is log(31) = 3.43; 30 steps reach ~3.17
