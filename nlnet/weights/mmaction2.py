"""mmaction2 1.x I3D checkpoints (``configs/recognition/i3d``): a safe reader, the name map and the import.

The files are mmengine checkpoints ``{"state_dict": {...}, "meta": {...}, ...}`` of a ``Recognizer3D`` whose
backbone is mmaction2's ``ResNet3d`` (I3D R50, inflation ``((1,1,1), (1,0,1,0), (1,0,1,0,1,0), (0,1,0))``,
non-local blocks from mmcv's ``NonLocal3d`` after res3 {1, 3} and res4 {1, 3, 5}) and whose head is ``I3DHead``.
The network differs from the official Caffe2 one (shared/reference/anchors-turn2.md §2), so the weights go into
nlnet's ``*_mmaction2`` presets (`nlnet.models.presets.STYLES`): pool1 1x3x3 stride 2 padded (0, 1, 1), keys and
values pooled after φ and g, no d^-0.5 scale, a global average pool in the head. The input normalisation of
these models (ImageNet mean / std in pixel units) is written next to the weights.

Key names, with an optional ``backbone.`` (the recogniser) or ``module.`` (DDP) prefix:
``conv1.{conv,bn}``; ``layer{L}.{i}.conv{1,2,3}.{conv,bn}``; ``layer{L}.{i}.downsample.{conv,bn}``;
``layer{L}.{i}.non_local_block.{theta,phi,g}[.0].conv.{weight,bias}`` (``.0`` when sub-sampled), ``conv_out.conv``,
``conv_out.bn``, ``concat_project.conv``; ``cls_head.fc_cls.{weight,bias}``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

from nlnet.weights.converted import convert_into, copy_fitted, rename
from nlnet.weights.inflate import LoadReport
from nlnet.weights.torchfile import read_torch_file, tensors_of

# ActionDataPreprocessor of every mmaction2 I3D config: torchvision's ImageNet statistics, RGB, pixel units.
NORMALIZATION = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
MODELS = {False: "i3d_r50_mmaction2", True: "nl_i3d_r50_mmaction2"}
FORMAT = "nlnet.mmaction2"

_PREFIX = r"^(?:module\.)?(?:backbone\.)?"
_LAYER = r"layer(\d)\.(\d+)\."


def _stage(match: re.Match) -> str:
    return f"res{int(match.group(1)) + 1}.{match.group(2)}."


# (mmaction2 key pattern, nlnet key built from the match); mmcv's ConvModule names its parts conv / bn.
_KEY_PATTERNS: tuple[tuple[re.Pattern, Callable[[re.Match], str]], ...] = (
    (re.compile(_PREFIX + r"conv1\.conv\.weight$"), lambda m: "stem.conv.weight"),
    (re.compile(_PREFIX + r"conv1\.bn\.(\w+)$"), lambda m: f"stem.bn.{m.group(1)}"),
    (re.compile(_PREFIX + _LAYER + r"conv([123])\.conv\.weight$"), lambda m: f"{_stage(m)}conv{m.group(3)}.weight"),
    (re.compile(_PREFIX + _LAYER + r"conv([123])\.bn\.(\w+)$"), lambda m: f"{_stage(m)}bn{m.group(3)}.{m.group(4)}"),
    (re.compile(_PREFIX + _LAYER + r"downsample\.conv\.weight$"), lambda m: f"{_stage(m)}downsample.0.weight"),
    (re.compile(_PREFIX + _LAYER + r"downsample\.bn\.(\w+)$"), lambda m: f"{_stage(m)}downsample.1.{m.group(3)}"),
    (
        re.compile(_PREFIX + _LAYER + r"non_local_block\.(theta|phi|g)(?:\.0)?\.conv\.(weight|bias)$"),
        lambda m: f"{_stage(m)}nonlocal_block.{m.group(3)}.{m.group(4)}",
    ),
    (
        re.compile(_PREFIX + _LAYER + r"non_local_block\.conv_out\.conv\.(weight|bias)$"),
        lambda m: f"{_stage(m)}nonlocal_block.out.{m.group(3)}",
    ),
    (
        re.compile(_PREFIX + _LAYER + r"non_local_block\.conv_out\.bn\.(\w+)$"),
        lambda m: f"{_stage(m)}nonlocal_block.norm.{m.group(3)}",
    ),
    (
        re.compile(_PREFIX + _LAYER + r"non_local_block\.concat_project\.conv\.weight$"),
        lambda m: f"{_stage(m)}nonlocal_block.concat.weight",
    ),
    (re.compile(r"^(?:module\.)?cls_head\.fc_cls\.(weight|bias)$"), lambda m: f"head.fc.{m.group(1)}"),
)
# mmcv's NonLocal3d `mode=...` inside the config text that mmengine stores in meta["cfg"].
_CFG_MODE = re.compile(r"non_local_cfg\s*=\s*dict\([^)]*mode\s*=\s*['\"](\w+)['\"]", re.S)


def nlnet_name(key: str) -> str | None:
    """The nlnet ResNet3d key of an mmaction2 key, or None for a tensor nlnet has no place for.

    For example ``backbone.layer2.1.non_local_block.phi.0.conv.weight`` -> ``res3.1.nonlocal_block.phi.weight``
    and ``cls_head.fc_cls.bias`` -> ``head.fc.bias``.
    """
    return rename(key, _KEY_PATTERNS)


def read_mmaction2(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """Read an mmaction2 / mmengine ``.pth`` without running its pickle's code.

    Args:
        path: ``{"state_dict": ..., "meta": ..., ...}`` as mmengine saves it, or a bare state dict.

    Returns:
        (state dict, meta, what was left unread): the weights; ``meta`` as read (refused objects inside it are
        `nlnet.weights.torchfile.Unread` records); the other top-level entries (``optimizer``, ``message_hub``,
        ...) and the classes that were not loaded.

    Raises:
        ValueError: no state dict, or a state-dict entry is not a tensor.
    """
    read = read_torch_file(path)
    content, where = read.content, os.fspath(path)
    unread = [f"{name} (refused, never called)" for name in read.refused]
    if isinstance(content, Mapping) and "state_dict" in content:
        unread = [f"entry {key!r}" for key in content if key not in ("state_dict", "meta")] + unread
        meta = content.get("meta")
        return tensors_of(content["state_dict"], f"{where} state_dict"), meta if isinstance(meta, dict) else {}, unread
    return tensors_of(content, where), {}, unread


def nonlocal_mode_from(meta: dict, state: Mapping[str, torch.Tensor]) -> str | None:
    """The non-local mode the weights imply (gaussian, concatenation) or the stored config names."""
    if not any(".non_local_block." in key for key in state):
        return None
    if any(".non_local_block.concat_project." in key for key in state):
        return "concatenation"
    if not any(".non_local_block.theta." in key for key in state):
        return "gaussian"
    cfg = meta.get("cfg")
    found = _CFG_MODE.search(cfg) if isinstance(cfg, str) else None
    return found.group(1) if found else None


def load_mmaction2_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> LoadReport:
    """Copy mmaction2 weights into an nlnet ``*_mmaction2`` ResNet3d, in place.

    Every shape is checked before anything is copied. The non-local output convolutions have no bias in
    mmaction2 (a BN follows them); nlnet's are set to 0, which computes the same.

    Returns:
        The model keys loaded, the model keys the file lacks (``missing``) and the file's keys nlnet has no
        place for (``unexpected``).

    Raises:
        ValueError: a tensor's shape does not fit, naming both keys.
    """
    targets = model.state_dict()
    report = LoadReport()
    fitted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        target = nlnet_name(key)
        if target is None or target not in targets:
            report.unexpected.append(key)
            continue
        shape = targets[target].shape
        if target.endswith("nonlocal_block.concat.weight") and tensor.numel() == shape.numel():
            tensor = tensor.reshape(shape)  # a (1, 2d, 1, 1) 1x1 Conv2d in mmcv, a (1, 2d) Linear here
        if tensor.shape != shape:
            raise ValueError(
                f"{key}: shape {tuple(tensor.shape)} does not fit {target} {tuple(shape)}; is --model the "
                "network the checkpoint was trained as?"
            )
        fitted[target] = tensor
    zero_bias = [
        key
        for key in targets
        if re.search(r"nonlocal_block\.out\.bias$", key)
        and key not in fitted
        and key.replace(".out.bias", ".norm.weight") in fitted
    ]
    for key in zero_bias:
        fitted[key] = torch.zeros_like(targets[key])
    copy_fitted(targets, fitted, report)
    if zero_bias:
        report.notes.append(f"{len(zero_bias)} non-local output convs have no bias in mmaction2: set to 0")
    return report


def convert_mmaction2(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    model: str | None = None,
    **overrides,
) -> LoadReport:
    """Convert an mmaction2 I3D ``.pth`` into an nlnet ``.pt`` (read it back with `load_converted`).

    Args:
        in_path: the mmengine checkpoint.
        out_path: where to write ``{"format", "model", "arch", "num_classes", "overrides", "missing",
            "normalization"}``; ``normalization`` is the {mean, std} (RGB, 0-255 pixel units) the model expects.
        model: an nlnet preset name; default ``nl_i3d_r50_mmaction2`` when the file has non-local blocks,
            ``i3d_r50_mmaction2`` otherwise.
        **overrides: passed to ``nlnet.models.create``. ``nonlocal_mode`` is found from the weights (gaussian,
            concatenation) or from the config text in ``meta["cfg"]``; pass it when neither tells.

    Returns:
        The load report, with what was left unread in the file among its notes.

    Raises:
        ValueError: a non-local file whose mode cannot be told, or a tensor whose shape does not fit (nothing is
            written then).
    """

    state, meta, unread = read_mmaction2(in_path)
    has_nonlocal = any(".non_local_block." in key for key in state)
    model = model or MODELS[has_nonlocal]
    overrides = dict(overrides)
    if has_nonlocal and "nonlocal_mode" not in overrides:
        mode = nonlocal_mode_from(meta, state)
        if mode is None:
            raise ValueError(
                f"{os.fspath(in_path)}: the non-local mode (embedded_gaussian or dot_product: the weights look the "
                "same) is not in the file's config; pass nonlocal_mode (--nonlocal-mode)"
            )
        overrides["nonlocal_mode"] = mode
    classifier = next((value for key, value in state.items() if key.endswith("cls_head.fc_cls.weight")), None)
    return convert_into(
        out_path, state, format=FORMAT, arch=model, overrides=overrides, classifier=classifier,
        load_state=load_mmaction2_state, unread=unread, normalization=NORMALIZATION,
    )
