"""The official Caffe2 model zoo of video-nonlocal-net: a safe reader, the name map, import and export.

The released files (``{c2d,i3d}_{baseline,nonlocal}_{32x2,8x8}_IN_pretrain_400k.pkl`` and the frozen-BN
``i3d_*_{128x1,32x4}_I3D_pretrain_400k.pkl``) are Python-2 pickles of ``{'blobs': {name: ndarray}}`` (some
derived files are the flat dict). A pickle can run arbitrary code when loaded, so `read_blobs` uses an
unpickler that can only build numpy arrays, numpy scalars and plain containers, and refuses anything else
before it is called.

Blob names (one per ResNet3d tensor, `caffe2_name`): ``conv1_w``; ``res_conv1_bn_{s,b,rm,riv}``;
``res{S}_{i}_branch2{a,b,c}_w`` and ``..._bn_*``; ``res{S}_{i}_branch1_w`` and ``..._bn_*`` for the shortcut;
``nonlocal_conv{S}_{i}_{theta,phi,g,out}_{w,b}`` and ``nonlocal_conv{S}_{i}_bn_*`` for the block after
residual block i; ``pred_{w,b}``. BN suffixes: s = γ, b = β, rm = running mean, riv = running *variance*.
Layouts agree with PyTorch's (Conv3d (O, I, kT, kH, kW), Linear (K, C)).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from nlnet.utils.io import atomic_write
from nlnet.weights.inflate import LoadReport, inflate_kernel, is_state_dict

# Training state that Caffe2 saves next to the weights; never model tensors.
_SKIPPED_NAMES = ("lr", "model_iter")
_SKIPPED_SUFFIX = "_momentum"
_BN_SUFFIX = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}
_BRANCH = {"1": "a", "2": "b", "3": "c"}
# The "format" of the files the importers write (this one, nlnet.weights.mmaction2, nlnet.weights.pyslowfast).
CONVERTED_FORMATS = ("nlnet.caffe2", "nlnet.mmaction2", "nlnet.pyslowfast")

_KEY_PATTERNS = (
    (re.compile(r"^stem\.conv\.weight$"), lambda m: "conv1_w"),
    (re.compile(r"^stem\.bn\.(\w+)$"), lambda m: _bn("res_conv1_bn", m.group(1))),
    (
        re.compile(r"^res(\d+)\.(\d+)\.conv([123])\.weight$"),
        lambda m: f"res{m.group(1)}_{m.group(2)}_branch2{_BRANCH[m.group(3)]}_w",
    ),
    (
        re.compile(r"^res(\d+)\.(\d+)\.bn([123])\.(\w+)$"),
        lambda m: _bn(f"res{m.group(1)}_{m.group(2)}_branch2{_BRANCH[m.group(3)]}_bn", m.group(4)),
    ),
    (
        re.compile(r"^res(\d+)\.(\d+)\.downsample\.0\.weight$"),
        lambda m: f"res{m.group(1)}_{m.group(2)}_branch1_w",
    ),
    (
        re.compile(r"^res(\d+)\.(\d+)\.downsample\.1\.(\w+)$"),
        lambda m: _bn(f"res{m.group(1)}_{m.group(2)}_branch1_bn", m.group(3)),
    ),
    (
        re.compile(r"^res(\d+)\.(\d+)\.nonlocal_block\.(theta|phi|g|out)\.(weight|bias)$"),
        lambda m: f"nonlocal_conv{m.group(1)}_{m.group(2)}_{m.group(3)}_{m.group(4)[0]}",
    ),
    (
        re.compile(r"^res(\d+)\.(\d+)\.nonlocal_block\.norm\.(\w+)$"),
        lambda m: _bn(f"nonlocal_conv{m.group(1)}_{m.group(2)}_bn", m.group(3)),
    ),
    (re.compile(r"^head\.fc\.(weight|bias)$"), lambda m: f"pred_{m.group(1)[0]}"),
)


class UnsafePickleError(ValueError):
    """A pickle asked for something other than numpy arrays and plain containers; nothing was run."""


def _bn(prefix: str, attribute: str) -> str | None:
    suffix = _BN_SUFFIX.get(attribute)  # num_batches_tracked has no blob
    return None if suffix is None else f"{prefix}_{suffix}"


def caffe2_name(key: str) -> str | None:
    """The Caffe2 blob name of a ResNet3d state-dict key, or None if Caffe2 has no such blob.

    For example ``res4.13.conv1.weight`` -> ``res4_13_branch2a_w`` and
    ``res3.1.nonlocal_block.norm.running_var`` -> ``nonlocal_conv3_1_bn_riv``. BN ``num_batches_tracked``
    and parameters of the non-local modes that the official code lacks (concatenation) have no name.
    """
    for pattern, name in _KEY_PATTERNS:
        match = pattern.match(key)
        if match:
            return name(match)
    return None


def _safe_codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 pickles bytes at protocol <= 2 as _codecs.encode(text, "latin1"); allow exactly that.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric

    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _safe_codecs_encode,
    }
    # Python 2 and numpy 1 files name numpy.core, numpy 2 numpy._core; both resolve to the same functions.
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the numpy array constructors; every other global is refused before it is called."""

    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refused to load {module}.{name}: a Caffe2 weight file holds only numpy arrays and plain "
                "containers, so this pickle may try to run code; nothing was executed"
            ) from None

    def persistent_load(self, pid: object) -> object:
        raise UnsafePickleError("refused a persistent id: not a Caffe2 weight file")


def read_blobs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a Caffe2 ``.pkl`` safely; drop training state (``*_momentum``, ``lr``, ``model_iter``).

    Args:
        path: a file holding ``{'blobs': {name: array}}`` or the flat ``{name: array}``.

    Returns:
        {blob name: numpy array}.

    Raises:
        UnsafePickleError: the pickle references anything but numpy arrays / scalars (nothing is executed).
        ValueError: the file is not a pickle of a dict of arrays.
    """
    with open(path, "rb") as handle:
        try:
            content = _NumpyOnlyUnpickler(handle, encoding="latin1").load()
        except UnsafePickleError:
            raise
        except Exception as error:  # a truncated or non-pickle file raises many different errors
            raise ValueError(f"{os.fspath(path)} is not a readable Caffe2 pickle: {error}") from error
    if isinstance(content, dict) and isinstance(content.get("blobs"), dict):
        content = content["blobs"]
    if not isinstance(content, dict):
        raise ValueError(f"expected a dict of blobs in {os.fspath(path)}, got {type(content).__name__}")
    blobs: dict[str, np.ndarray] = {}
    for name, value in content.items():
        if name in _SKIPPED_NAMES or str(name).endswith(_SKIPPED_SUFFIX):
            continue
        if not isinstance(value, (np.ndarray, np.generic)):
            raise ValueError(f"blob {name!r} in {os.fspath(path)} is a {type(value).__name__}, not an array")
        blobs[str(name)] = np.asarray(value)
    return blobs


def load_blobs(model: nn.Module, blobs: Mapping[str, np.ndarray]) -> LoadReport:
    """Copy Caffe2 blobs into a ResNet3d, in place.

    2D ImageNet kernels are inflated over time (repeat, divide by kT). A BN with only ``_s``/``_b`` (the
    frozen-BN "affine" files, where those are already γ/√(var+eps) and β − mean·γ/√(var+eps)) is loaded with
    running_mean 0 and running_var 1 − eps, which in eval mode is exactly the affine map.

    Args:
        model: the ResNet3d to fill.
        blobs: from `read_blobs`.

    Returns:
        Model keys loaded; blob names the model expects but the file lacks (``missing``) and blobs the model
        has no place for (``unexpected``).

    Raises:
        ValueError: a blob's shape does not fit the model tensor (nothing is half-written: shapes are checked
            before any copy).
    """
    targets = model.state_dict()
    by_blob = {name: key for key in targets if (name := caffe2_name(key)) is not None}
    report = LoadReport()
    fitted: dict[str, torch.Tensor] = {}
    for blob, value in blobs.items():
        key = by_blob.get(blob)
        if key is None:
            report.unexpected.append(blob)
            continue
        tensor = torch.from_numpy(np.array(value, dtype=np.float32))
        target_shape = targets[key].shape
        trailing = tensor.shape[len(target_shape) :]
        if trailing and tensor.shape[: len(target_shape)] == target_shape and set(trailing) == {1}:
            # pred_w saved from the fully-convolutional test net as (K, C, 1, 1, 1).
            tensor = tensor.reshape(target_shape)
        fitted[key] = inflate_kernel(tensor, target_shape, name=blob)
        if tensor.dim() == 4 and fitted[key].shape[2] > 1:
            report.inflated.append(key)
    frozen_bn = []
    for module_name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        prefix = f"{module_name}."
        stats = (f"{prefix}running_mean", f"{prefix}running_var")
        if f"{prefix}weight" in fitted and not any(key in fitted for key in stats):
            fitted[stats[0]] = torch.zeros_like(targets[stats[0]])
            fitted[stats[1]] = torch.full_like(targets[stats[1]], 1.0 - module.eps)
            frozen_bn.append(module_name)
    with torch.no_grad():
        for key, tensor in fitted.items():
            targets[key].copy_(tensor)
    report.loaded = list(fitted)
    report.missing = [blob for blob, key in by_blob.items() if key not in fitted]
    if frozen_bn:
        report.notes.append(
            f"{len(frozen_bn)} BN layers had only _s/_b (frozen-BN 'affine' file): loaded with "
            "running_mean 0 and running_var 1 - eps, exact in eval mode; keep these BN layers frozen when "
            "fine-tuning"
        )
    return report


def convert_caffe2(
    in_path: str | os.PathLike, out_path: str | os.PathLike, model: str, **overrides
) -> LoadReport:
    """Convert an official ``.pkl`` into an nlnet ``.pt`` for ``nlnet.models.create(model, ...)``.

    The class count comes from ``pred_w``. If the file has non-local convolutions but no non-local BN blobs
    (the frozen-BN long-clip models) and ``nonlocal_norm`` is not given, the model is built with
    ``nonlocal_norm=None`` to match.

    Args:
        in_path: the Caffe2 pickle.
        out_path: where to write ``{"model": state dict, "arch": model, "num_classes", "overrides",
            "missing", "format"}``, the layout of an nlnet checkpoint (read it back with `load_converted`, the
            training engine's ``model.checkpoint``, or ``torch.load(weights_only=True)``).
        model: a name from ``nlnet.models.available()``.
        **overrides: passed to ``nlnet.models.create`` (for example ``nonlocal_blocks``).

    Returns:
        The load report: missing and unexpected blobs, frozen-BN handling.

    Raises:
        UnsafePickleError: the pickle would run code.
        ValueError: a blob's shape does not fit the model.
    """
    from nlnet.models import create

    blobs = read_blobs(in_path)
    num_classes = int(blobs["pred_w"].shape[0]) if "pred_w" in blobs else 400
    has_nonlocal = any(name.startswith("nonlocal_conv") for name in blobs)
    has_nonlocal_bn = any(re.match(r"^nonlocal_conv\d+_\d+_bn_", name) for name in blobs)
    overrides = dict(overrides)
    notes = []
    if has_nonlocal and not has_nonlocal_bn and "nonlocal_norm" not in overrides:
        overrides["nonlocal_norm"] = None
        notes.append("no non-local BN blobs in the file: built with nonlocal_norm=None")
    network = create(model, num_classes=num_classes, **overrides)
    report = load_blobs(network, blobs)
    report.notes = notes + report.notes
    payload = {
        "format": "nlnet.caffe2",
        "model": network.state_dict(),
        "arch": model,
        "num_classes": num_classes,
        "overrides": overrides,
        "missing": list(report.missing),
    }
    atomic_write(out_path, lambda stream: torch.save(payload, stream))
    return report


def load_converted(path: str | os.PathLike) -> nn.Module:
    """Build the model a converted file describes and load its weights (strict).

    Args:
        path: an ``.pt`` written by `convert_caffe2`, ``convert_mmaction2`` or ``convert_pyslowfast``.

    Returns:
        The ResNet3d in eval mode.
    """
    from nlnet.models import create

    payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") not in CONVERTED_FORMATS:
        raise ValueError(f"{os.fspath(path)} was not written by nlnet convert")
    network = create(payload["arch"], num_classes=payload["num_classes"], **payload["overrides"])
    network.load_state_dict(payload["model"])
    return network.eval()


def export_caffe2(
    source: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike, out_path: str | os.PathLike
) -> list[str]:
    """Write a ResNet3d (or its weights) as an official-style Caffe2 pickle ``{'blobs': {name: array}}``.

    Args:
        source: the model, its state dict, or a ``.pt`` file holding a state dict or an nlnet checkpoint
            (``{"model": state dict, ...}``, as `convert_caffe2` and the training engine write).
        out_path: the ``.pkl`` to write (atomically).

    Returns:
        The blob names written.

    Raises:
        ValueError: a tensor has no Caffe2 name (e.g. a concatenation-mode non-local block).
    """
    if isinstance(source, nn.Module):
        state = source.state_dict()
    elif isinstance(source, Mapping):
        state = source
    else:
        state = torch.load(os.fspath(source), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not is_state_dict(state):
            raise ValueError(f"{os.fspath(source)}: expected a state dict or a checkpoint with 'model'")
    blobs: dict[str, np.ndarray] = {}
    for key, tensor in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        name = caffe2_name(key)
        if name is None:
            raise ValueError(f"{key} has no Caffe2 blob name; the official models have no such tensor")
        blobs[name] = tensor.detach().cpu().float().numpy().copy()
    atomic_write(out_path, lambda stream: pickle.dump({"blobs": blobs}, stream, protocol=4))
    return list(blobs)
