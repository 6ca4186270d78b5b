"""The paper's networks, one registry: C2D / I3D ResNet-50/101 video models from presets, and the §6 detectors."""

from nlnet.models.registry import available, create, describe, nonlocal_blocks
from nlnet.models.resnet3d import ResNet3d

__all__ = ["ResNet3d", "available", "create", "describe", "nonlocal_blocks"]
