"""The side-information model of FCT: a small self-supervised embedding stored next to each old embedding.

It is trained with SimCLR (NT-Xent on two augmented views, ``raybackfill.compat.losses.nt_xent_loss``)
and no labels, so it captures image content the old model's label-driven training threw away; the
forward transformation uses it to recover more of the new embedding. Small (32-d by default) because it
is stored for every gallery item.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raybackfill.data.preprocessing import MEAN, STD
from raybackfill.models.backbones import SmallConvTrunk


class SideInfoModel(nn.Module):
    """Conv trunk -> ``embedding_dim`` side-info; a projection head on top is used only by the SimCLR loss
    (SimCLR's finding: the representation before the projection head transfers better)."""

    def __init__(self, embedding_dim: int = 32, width: int = 16, projection_dim: int = 32) -> None:
        super().__init__()
        self.trunk = SmallConvTrunk(width)
        self.embedding = nn.Linear(self.trunk.out_dim, embedding_dim)
        self.projection = nn.Sequential(
            nn.Linear(embedding_dim, embedding_dim), nn.ReLU(), nn.Linear(embedding_dim, projection_dim)
        )
        self.embedding_dim = embedding_dim

    @property
    def dims(self) -> dict[str, int]:
        return {"embedding": self.embedding_dim}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.trunk(images))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (side-info embedding, projection for the contrastive loss)."""
        features = self.embed(images)
        return features, self.projection(features)


@dataclass(frozen=True)
class AugmentConfig:
    """SimCLR-style augmentations, scaled for 32-64 px images."""

    crop_scale: tuple[float, float] = (0.35, 1.0)  # area fraction of the random crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio of the crop
    flip_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    grayscale_p: float = 0.2


_GRAY_WEIGHTS = torch.tensor([0.299, 0.587, 0.114])


def augment(
    images: torch.Tensor, config: AugmentConfig | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random resized crop + horizontal flip + colour jitter + random grayscale, batched on any device.

    ``images`` are (N, 3, H, W) normalised with ``raybackfill.data.preprocessing`` MEAN/STD; the result is too.
    Each image gets its own random parameters, drawn from ``generator`` (on the CPU) for reproducibility.
    """
    config = config or AugmentConfig()
    n = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * torch.rand(n, generator=generator)).to(images.device, images.dtype)

    # Crop + flip as one affine resampling: output coords [-1, 1] map to a window of the input.
    area = uniform(*config.crop_scale)
    log_ratio = uniform(math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1]))
    width = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    height = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    center_x = (1 - width) * uniform(-1.0, 1.0)
    center_y = (1 - height) * uniform(-1.0, 1.0)
    flip = torch.where(uniform(0.0, 1.0) < config.flip_p, -1.0, 1.0).to(images.dtype)
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = center_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = center_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    x = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    mean = torch.as_tensor(MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.as_tensor(STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    gray_weights = _GRAY_WEIGHTS.to(x.device, x.dtype).view(1, 3, 1, 1)
    x = (x * std + mean).clamp(0, 1)  # jitter in [0, 1] pixel space, where its factors are meaningful

    def per_image(values: torch.Tensor) -> torch.Tensor:
        return values.view(n, 1, 1, 1)

    x = (x * per_image(uniform(1 - config.brightness, 1 + config.brightness))).clamp(0, 1)
    mean_gray = (x * gray_weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = ((x - mean_gray) * per_image(uniform(1 - config.contrast, 1 + config.contrast)) + mean_gray).clamp(0, 1)
    gray = (x * gray_weights).sum(1, keepdim=True)
    x = ((x - gray) * per_image(uniform(1 - config.saturation, 1 + config.saturation)) + gray).clamp(0, 1)
    to_gray = per_image(uniform(0.0, 1.0) < config.grayscale_p)
    x = torch.where(to_gray, (x * gray_weights).sum(1, keepdim=True).expand_as(x), x)
    return (x - mean) / std
