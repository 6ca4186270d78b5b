"""PySlowFast PyTorch checkpoints (``.pyth``) of its C2D / I3D / I3D-NLN ResNets: name map and import.

A ``.pyth`` is ``{"epoch", "model_state", "optimizer_state", "cfg" (YAML text), ...}``. The ResNet's names
(``slowfast/models/video_model_builder.py``, ``resnet_helper.py``, ``stem_helper.py``, ``head_helper.py``):
``s1.pathway0_stem.{conv,bn}``; ``s{S}.pathway0_res{i}.branch1`` / ``branch1_bn`` (shortcut) and
``branch2.{a,b,c}`` / ``branch2.{a,b,c}_bn``; ``s{S}.pathway0_nonlocal{i}.conv_{theta,phi,g,out}`` and ``.bn`` for
the block after residual block i; ``head.projection``. Its non-local block is the official one (pool before
φ and g, d^-0.5 scale, biases), its stem pads pool1 (0, 1, 1): the weights go into nlnet's presets with
``clip="8x8_pyslowfast"``. Its Caffe2 zoo files (``c2/*.pkl``) carry the official blob names and import with
``nlnet convert caffe2`` (PySlowFast's ``c2_model_loading`` maps them onto the same names as here).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from torch import nn

from nlnet.weights.converted import convert_into, copy_fitted, rename
from nlnet.weights.inflate import LoadReport
from nlnet.weights.torchfile import read_torch_file, tensors_of

# PySlowFast's DATA.MEAN / DATA.STD (0.45, 0.225 on [0, 1]) in pixel units, RGB.
NORMALIZATION = {"mean": [114.75, 114.75, 114.75], "std": [57.375, 57.375, 57.375]}
FORMAT = "nlnet.pyslowfast"
CLIP = "8x8_pyslowfast"
_BRANCH = {"1": "a", "2": "b", "3": "c"}
_MODES = {"softmax": "embedded_gaussian", "dot_product": "dot_product"}
_CFG_MODE = re.compile(r"NONLOCAL:(?:\n[ \t]+.*)*?\n[ \t]+INSTANTIATION:\s*(\w+)")

_KEY_PATTERNS = (
    (re.compile(r"^stem\.(conv|bn)\.(\w+)$"), lambda m: f"s1.pathway0_stem.{m.group(1)}.{m.group(2)}"),
    (
        re.compile(r"^res(\d)\.(\d+)\.conv([123])\.weight$"),
        lambda m: f"s{m.group(1)}.pathway0_res{m.group(2)}.branch2.{_BRANCH[m.group(3)]}.weight",
    ),
    (
        re.compile(r"^res(\d)\.(\d+)\.bn([123])\.(\w+)$"),
        lambda m: f"s{m.group(1)}.pathway0_res{m.group(2)}.branch2.{_BRANCH[m.group(3)]}_bn.{m.group(4)}",
    ),
    (
        re.compile(r"^res(\d)\.(\d+)\.downsample\.0\.weight$"),
        lambda m: f"s{m.group(1)}.pathway0_res{m.group(2)}.branch1.weight",
    ),
    (
        re.compile(r"^res(\d)\.(\d+)\.downsample\.1\.(\w+)$"),
        lambda m: f"s{m.group(1)}.pathway0_res{m.group(2)}.branch1_bn.{m.group(3)}",
    ),
    (
        re.compile(r"^res(\d)\.(\d+)\.nonlocal_block\.(theta|phi|g|out)\.(weight|bias)$"),
        lambda m: f"s{m.group(1)}.pathway0_nonlocal{m.group(2)}.conv_{m.group(3)}.{m.group(4)}",
    ),
    (
        re.compile(r"^res(\d)\.(\d+)\.nonlocal_block\.norm\.(\w+)$"),
        lambda m: f"s{m.group(1)}.pathway0_nonlocal{m.group(2)}.bn.{m.group(3)}",
    ),
    (re.compile(r"^head\.fc\.(weight|bias)$"), lambda m: f"head.projection.{m.group(1)}"),
)


def pyslowfast_name(key: str) -> str | None:
    """The PySlowFast name of an nlnet ResNet3d key (``res3.1.nonlocal_block.theta.weight`` ->
    ``s3.pathway0_nonlocal1.conv_theta.weight``), or None where PySlowFast has no such tensor."""
    return rename(key, _KEY_PATTERNS)


def read_pyslowfast(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Read a ``.pyth`` without running its pickle's code: (model_state, cfg text or "", what was left unread)."""
    read = read_torch_file(path)
    content, where = read.content, os.fspath(path)
    unread = [f"{name} (refused, never called)" for name in read.refused]
    if isinstance(content, Mapping) and "model_state" in content:
        unread = [f"entry {key!r}" for key in content if key not in ("model_state", "cfg")] + unread
        state = {key.removeprefix("module."): value for key, value in content["model_state"].items()}
        cfg = content.get("cfg")
        return tensors_of(state, f"{where} model_state"), cfg if isinstance(cfg, str) else "", unread
    return tensors_of(content, where), "", unread


def architecture(state: Mapping[str, torch.Tensor]) -> tuple[str, int]:
    """PySlowFast's MODEL.ARCH ("c2d" or "i3d", from conv1's temporal kernel) and RESNET.DEPTH (50 or 101, from
    the res4 block count) of a model_state.

    Raises:
        ValueError: the tensors are not those of a PySlowFast ResNet of either depth.
    """
    stem = state.get("s1.pathway0_stem.conv.weight")
    if stem is None or stem.dim() != 5:
        raise ValueError("no 5-D s1.pathway0_stem.conv.weight: not a PySlowFast ResNet; pass --model")
    res4_blocks = len(block_indices(state, "res")[2])
    depth = {6: 50, 23: 101}.get(res4_blocks)
    if depth is None:
        raise ValueError(f"res4 has {res4_blocks} blocks, neither R50 (6) nor R101 (23); pass --model")
    return ("i3d" if stem.shape[2] > 1 else "c2d"), depth


def block_indices(state: Mapping[str, torch.Tensor], kind: str) -> list[list[int]]:
    """Per stage s2..s5, the sorted indices i of the ``s{S}.pathway0_{kind}{i}.*`` tensors: with ``kind``
    "nonlocal" where the non-local blocks sit (PySlowFast's NONLOCAL.LOCATION), with "res" the residual blocks."""
    pattern = re.compile(rf"^s(\d)\.pathway0_{kind}(\d+)\.")
    found: list[set[int]] = [set() for _ in range(4)]
    for key in state:
        if (match := pattern.match(key)) and 2 <= int(match.group(1)) <= 5:
            found[int(match.group(1)) - 2].add(int(match.group(2)))
    return [sorted(indices) for indices in found]


def nonlocal_mode_of(cfg: str) -> str | None:
    """nlnet's name for the NONLOCAL.INSTANTIATION a checkpoint's cfg text records, or None where it has none."""
    found = _CFG_MODE.search(cfg)
    return _MODES.get(found.group(1)) if found else None


def _guess_model(state: Mapping[str, torch.Tensor]) -> str:
    """The nlnet preset of a model_state: `architecture`, with nl_ if non-local tensors exist."""
    arch, depth = architecture(state)
    return f"{'nl_' if any('_nonlocal' in key for key in state) else ''}{arch}_r{depth}"


def load_pyslowfast_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> LoadReport:
    """Copy PySlowFast weights into an nlnet ResNet3d, in place, after checking every shape.

    Raises:
        ValueError: a tensor's shape does not fit, naming both keys.
    """
    targets = model.state_dict()
    by_source = {name: key for key in targets if (name := pyslowfast_name(key)) is not None}
    report = LoadReport()
    fitted: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        key = by_source.get(name)
        if key is None:
            report.unexpected.append(name)
            continue
        if tensor.shape != targets[key].shape:
            raise ValueError(
                f"{name}: shape {tuple(tensor.shape)} does not fit {key} {tuple(targets[key].shape)}; is --model "
                "the network the checkpoint was trained as?"
            )
        fitted[key] = tensor
    copy_fitted(targets, fitted, report)
    return report


def convert_pyslowfast(
    in_path: str | os.PathLike, out_path: str | os.PathLike, model: str | None = None, **overrides
) -> LoadReport:
    """Convert a PySlowFast ``.pyth`` into an nlnet ``.pt`` (read it back with `load_converted`).

    Args:
        in_path: the checkpoint.
        out_path: where to write ``{"format", "model", "arch", "num_classes", "overrides", "missing",
            "normalization"}``.
        model: an nlnet preset; default guessed from the weights (c2d_r50, i3d_r50, nl_i3d_r50, ...).
        **overrides: for ``nlnet.models.create``; ``clip`` defaults to "8x8_pyslowfast", ``nonlocal_mode`` to
            the cfg's NONLOCAL.INSTANTIATION (softmax -> embedded_gaussian).

    Raises:
        ValueError: a tensor whose shape does not fit, or a non-local file whose mode cannot be told; nothing
            is written then.
    """

    state, cfg, unread = read_pyslowfast(in_path)
    model = model or _guess_model(state)
    overrides = {"clip": CLIP, **overrides}
    if any("_nonlocal" in key for key in state) and "nonlocal_mode" not in overrides:
        mode = nonlocal_mode_of(cfg)
        if mode is None:
            raise ValueError(
                f"{os.fspath(in_path)}: NONLOCAL.INSTANTIATION is not in the file's cfg; pass nonlocal_mode "
                "(--nonlocal-mode embedded_gaussian for softmax, dot_product)"
            )
        overrides["nonlocal_mode"] = mode
    return convert_into(
        out_path, state, format=FORMAT, arch=model, overrides=overrides, classifier=state.get("head.projection.weight"),
        load_state=load_pyslowfast_state, unread=unread, normalization=NORMALIZATION,
    )
