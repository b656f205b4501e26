"""Image embedding backbones: a trunk, a linear embedding layer and a linear classifier head.

Retrieval uses the embedding (the layer before the classifier); the classifier exists because every
compatible-training method here (BCT's influence loss, RACT's CE term, FastFill's CE term through the
frozen new classifier, the old-classifier uncertainty used to order a backfill) needs one.
"""

from __future__ import annotations

import torch
from torch import nn


class EmbeddingModel(nn.Module):
    """``trunk`` (images -> (N, trunk_dim)) -> ``embedding`` Linear -> ``classifier`` Linear."""

    def __init__(self, trunk: nn.Module, trunk_dim: int, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        if embedding_dim <= 0 or num_classes <= 0:
            raise ValueError(f"embedding_dim and num_classes must be positive, got {embedding_dim}, {num_classes}")
        self.trunk = trunk
        self.embedding = nn.Linear(trunk_dim, embedding_dim)
        self.classifier = nn.Linear(embedding_dim, num_classes)
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes

    @property
    def dims(self) -> dict[str, int]:
        return {"embedding": self.embedding_dim, "num_classes": self.num_classes}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, embedding_dim) features (no L2 normalisation)."""
        return self.embedding(self.trunk(images))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.embed(images)
        return features, self.classifier(features)


def conv_bn_relu(channels_in: int, channels_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
    )


class SmallConvTrunk(nn.Sequential):
    """Four 3x3 conv blocks (strides 1, 2, 2, 2) and global average pooling: ~0.24M parameters at width 32,
    small enough that tests and CPU demos train real models on one CPU core in seconds."""

    def __init__(self, width: int = 32) -> None:
        super().__init__(
            conv_bn_relu(3, width),
            conv_bn_relu(width, 2 * width, stride=2),
            conv_bn_relu(2 * width, 4 * width, stride=2),
            conv_bn_relu(4 * width, 4 * width, stride=2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.out_dim = 4 * width


def small_cnn(*, embedding_dim: int = 128, num_classes: int = 10, width: int = 32) -> EmbeddingModel:
    """A small CNN for 32x32 RGB images (any size works: the trunk ends in global pooling)."""
    trunk = SmallConvTrunk(width)
    return EmbeddingModel(trunk, trunk.out_dim, embedding_dim, num_classes)


def _torchvision_resnet(name: str, embedding_dim: int, num_classes: int, small_images: bool) -> EmbeddingModel:
    # Imported here: torchvision is slow to import and most workers (transformation, index) never need it.
    from torchvision import models as tv_models

    net = getattr(tv_models, name)(weights=None)
    if small_images:
        # CIFAR-style stem: the 7x7/2 conv and the max-pool would shrink a 32x32 image to 8x8 at once.
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    trunk_dim = net.fc.in_features
    net.fc = nn.Identity()
    return EmbeddingModel(net, trunk_dim, embedding_dim, num_classes)


def resnet18(*, embedding_dim: int = 128, num_classes: int = 10, small_images: bool = True) -> EmbeddingModel:
    """torchvision ResNet-18 (random init) with a linear embedding layer; ``small_images`` for 32-64 px."""
    return _torchvision_resnet("resnet18", embedding_dim, num_classes, small_images)


def resnet50(*, embedding_dim: int = 128, num_classes: int = 10, small_images: bool = True) -> EmbeddingModel:
    """torchvision ResNet-50 (random init): the papers' ResNet-50-128 with ``embedding_dim=128``."""
    return _torchvision_resnet("resnet50", embedding_dim, num_classes, small_images)
