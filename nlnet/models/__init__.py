"""The paper's video networks: C2D / I3D ResNet-50/101 with non-local blocks, built from presets."""

from nlnet.models.registry import available, create, describe, nonlocal_blocks
from nlnet.models.resnet3d import ResNet3d

__all__ = ["ResNet3d", "available", "create", "describe", "nonlocal_blocks"]
