"""Initialise a video ResNet from a 2D ImageNet ResNet by inflating its kernels over time.

Wang et al. (CVPR 2018, §4) and I3D: a 2D kernel W of shape (O, I, kH, kW) becomes a kT x kH x kW kernel whose
kT temporal planes are each W / kT, so a clip of identical frames gives every frame the 2D network's response.
C2D has kT = 1 everywhere (the weights are copied); I3D inflates conv1 to 5 and some bottleneck convs to 3.
Non-local blocks and the new classifier have no 2D counterpart and keep their own initialisation.

The 2D source is a torchvision-format ResNet state dict (``conv1``, ``bn1``, ``layer1``..``layer4``, ``fc``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from nlnet.models import create

logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What a weight loader did.

    Attributes:
        loaded: model keys given values from the source.
        inflated: the subset of ``loaded`` whose 2D kernels were inflated to a temporal kernel > 1.
        missing: model keys the source had nothing for (they keep their initialisation).
        unexpected: source entries that went nowhere.
        notes: anything else worth knowing (skipped entries, conventions applied).
    """

    loaded: list[str] = field(default_factory=list)
    inflated: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Counts plus the full lists of missing and unexpected names."""
        lines = [f"loaded {len(self.loaded)} tensors ({len(self.inflated)} inflated over time)"]
        lines.append(f"missing (kept their initialisation): {len(self.missing)}")
        lines.extend(f"  {name}" for name in self.missing)
        lines.append(f"unexpected (not loaded): {len(self.unexpected)}")
        lines.extend(f"  {name}" for name in self.unexpected)
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def is_state_dict(obj: object) -> bool:
    """True for a mapping of names to tensors, what ``module.state_dict()`` returns."""
    return isinstance(obj, Mapping) and all(isinstance(value, torch.Tensor) for value in obj.values())


def inflate_kernel(weight: torch.Tensor, shape: torch.Size | tuple[int, ...], name: str = "") -> torch.Tensor:
    """Fit a source tensor to a model tensor's shape, inflating 2D kernels over time.

    Args:
        weight: the source tensor, e.g. a 2D kernel (O, I, kH, kW).
        shape: the model tensor's shape, e.g. (O, I, kT, kH, kW).
        name: the tensor's name, for error messages.

    Returns:
        ``weight`` itself when the shapes agree; for a 4-D kernel and a 5-D target with equal (O, I) and
        (kH, kW), the kernel repeated kT times along time and divided by kT.

    Raises:
        ValueError: when the shapes cannot be matched.
    """
    shape = tuple(shape)
    if tuple(weight.shape) == shape:
        return weight
    kernel_2d = weight.dim() == 4 and len(shape) == 5
    if kernel_2d and weight.shape[:2] == shape[:2] and weight.shape[2:] == shape[3:]:
        temporal = shape[2]
        return weight.unsqueeze(2).repeat(1, 1, temporal, 1, 1) / temporal
    raise ValueError(f"shape mismatch for {name or 'tensor'}: source {tuple(weight.shape)}, model {shape}")


# torchvision ResNet name -> nlnet ResNet3d name; the bottleneck internals share torchvision's names.
_TORCHVISION_PREFIXES = ((re.compile(r"^conv1\."), "stem.conv."), (re.compile(r"^bn1\."), "stem.bn."))
_TORCHVISION_LAYER = re.compile(r"^layer([1-4])\.")


def torchvision_to_nlnet(key: str) -> str | None:
    """Map a torchvision ResNet state-dict key to the ResNet3d key, or None for the classifier.

    ``conv1.weight`` -> ``stem.conv.weight``; ``bn1.*`` -> ``stem.bn.*``; ``layer{k}.*`` -> ``res{k+1}.*``.
    """
    for pattern, replacement in _TORCHVISION_PREFIXES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    match = _TORCHVISION_LAYER.match(key)
    if match:
        return f"res{int(match.group(1)) + 1}." + key[match.end() :]
    return None


def load_2d(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> LoadReport:
    """Inflate a 2D torchvision ResNet into a ResNet3d, in place.

    Args:
        model: a `nlnet.models.ResNet3d` (C2D or I3D, any non-local layout) of the same depth.
        source: path to a state-dict file (read with ``torch.load(weights_only=True)``) or the dict itself.

    Returns:
        What was loaded, inflated, left at init (non-local blocks, the classifier) and not used (``fc.*``).

    Raises:
        FileNotFoundError: ``source`` is a path and no file is there.
        ValueError: if the file is not a state dict or a kernel cannot be inflated to the model's shape.
    """
    if isinstance(source, Mapping):
        state = source
    else:
        if not os.path.isfile(source):
            raise FileNotFoundError(
                f"pretrained 2D weights not found: {os.fspath(source)!r} (expected torchvision's ImageNet ResNet "
                "state dict of the model's depth there, e.g. torch.save(torchvision.models.resnet50(weights="
                "torchvision.models.ResNet50_Weights.IMAGENET1K_V1).state_dict(), path); or set "
                "model.pretrained_2d=null to train from scratch)"
            )
        state = torch.load(os.fspath(source), map_location="cpu", weights_only=True)
    if not is_state_dict(state):
        raise ValueError(f"expected a torchvision-format state dict (name -> tensor) in {source!r}")
    targets = model.state_dict()
    report = LoadReport()
    with torch.no_grad():
        for key, value in state.items():
            target_key = torchvision_to_nlnet(key)
            if target_key is None or target_key not in targets:
                report.unexpected.append(key)
                continue
            target = targets[target_key]
            fitted = inflate_kernel(value, target.shape, name=key)
            target.copy_(fitted)
            report.loaded.append(target_key)
            if value.dim() == 4 and fitted.shape[2] > 1:
                report.inflated.append(target_key)
    filled = set(report.loaded)
    report.missing = [key for key in targets if key not in filled]
    if any(key.startswith("fc.") for key in report.unexpected):
        report.notes.append("the 2D classifier (fc.*) is not used: the video head keeps its N(0, 0.01) init")
    return report


def create_pretrained(name: str, path: str | os.PathLike, num_classes: int = 400, **overrides) -> nn.Module:
    """``nlnet.models.create(name, num_classes, **overrides)`` initialised from a 2D ImageNet ResNet.

    Args:
        name: a video model name from ``nlnet.models.available("video")``.
        path: a torchvision-format 2D ResNet state-dict file (see :func:`load_2d`).
        num_classes: classifier outputs.
        **overrides: as for ``nlnet.models.create``.

    Returns:
        The network in training mode; forward (B, 3, T, H, W) -> (B, num_classes).
    """
    model = create(name, num_classes, **overrides)
    report = load_2d(model, os.fspath(path))
    # Non-local blocks and the new classifier have no 2D counterpart; anything else missing is a surprise.
    surprising = [key for key in report.missing if ".nonlocal_block." not in key and not key.startswith("head.")]
    level = logging.WARNING if surprising else logging.INFO
    logger.log(level, "%s from %s: %s", name, path, report.summary())
    return model
