"""What the mmaction2 and PySlowFast importers share: copying checked tensors in, writing the converted file.

A converted file is ``{"format", "model", "arch", "num_classes", "overrides", "missing", "normalization"}``:
the nlnet state dict and what `nlnet.weights.load_converted` needs to rebuild the network, plus the pixel
mean/std the source framework's models expect.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from nlnet.models import create
from nlnet.utils.io import atomic_write
from nlnet.weights.inflate import LoadReport


def rename(key: str, patterns: Sequence[tuple[re.Pattern, Callable[[re.Match], str]]]) -> str | None:
    """The name the first matching ``(pattern, name_of_match)`` gives ``key``, or None if none matches."""
    for pattern, name in patterns:
        match = pattern.match(key)
        if match:
            return name(match)
    return None


def copy_fitted(targets: Mapping[str, torch.Tensor], fitted: Mapping[str, torch.Tensor], report: LoadReport) -> None:
    """Copies ``fitted`` (already shape-checked) into the model tensors ``targets``; records loaded and missing."""
    with torch.no_grad():
        for key, tensor in fitted.items():
            targets[key].copy_(tensor)
    report.loaded = list(fitted)
    report.missing = [key for key in targets if key not in fitted]


def convert_into(
    out_path: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    *,
    format: str,
    arch: str,
    overrides: Mapping,
    classifier: torch.Tensor | None,
    load_state: Callable[[nn.Module, Mapping[str, torch.Tensor]], LoadReport],
    unread: Sequence[str],
    normalization: Mapping[str, list[float]],
) -> LoadReport:
    """Builds ``arch`` with as many classes as the source's ``classifier`` weight has rows (400 without one),
    loads ``state`` into it with ``load_state`` and writes the converted file."""
    num_classes = 400 if classifier is None else int(classifier.shape[0])
    network = create(arch, num_classes=num_classes, **overrides)
    report = load_state(network, state)
    return write_converted(
        out_path, format=format, network=network, arch=arch, num_classes=num_classes, overrides=overrides,
        report=report, unread=unread, normalization=normalization,
    )


def write_converted(
    out_path: str | os.PathLike,
    *,
    format: str,
    network: nn.Module,
    arch: str,
    num_classes: int,
    overrides: Mapping,
    report: LoadReport,
    unread: Sequence[str],
    normalization: Mapping[str, list[float]],
) -> LoadReport:
    """Writes ``network``'s weights as a converted file (atomically); notes what the source left unread."""
    if unread:
        report.notes.append("left unread: " + ", ".join(unread))
    payload = {
        "format": format,
        "model": network.state_dict(),
        "arch": arch,
        "num_classes": num_classes,
        "overrides": dict(overrides),
        "missing": list(report.missing),
        "normalization": dict(normalization),
    }
    atomic_write(out_path, lambda stream: torch.save(payload, stream))
    return report
