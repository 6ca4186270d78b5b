"""Recipe -> model: the one place that builds a network from a recipe's ``model`` section and loads its weights.

Both families go through here, told apart by ``nlnet.models.available("detection")``:

- video models (``nlnet.engine.config``'s schema): ``nlnet.models.create`` with ``model.num_classes``,
  ``model.dropout`` and ``model.overrides``; then ``model.pretrained_2d`` (ImageNet weights inflated by
  ``nlnet.weights.create_pretrained``) and ``model.checkpoint`` (an nlnet checkpoint or a converted official
  model, loaded by name and shape);
- detectors (``nlnet.engine.detection``'s schema): ``nlnet.models.create`` with the ``nonlocal_*``,
  ``backbone_norm`` and ``trainable_backbone_layers`` keys, sized by the dataset (classes, keypoints) or by a
  trained state dict; then ``model.weights_backbone`` and ``model.weights`` (torchvision-format files).

Every file is read with ``torch.load(weights_only=True)`` (``nlnet.engine.checkpoint.load_checkpoint``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from nlnet.engine.checkpoint import DETECTION_CHECKPOINT_FORMAT, load_checkpoint
from nlnet.models import available, create
from nlnet.models import detection as detection_models
from nlnet.weights import create_pretrained, is_state_dict

if TYPE_CHECKING:
    from nlnet.data.coco import CocoDetection

logger = logging.getLogger(__name__)

__all__ = [
    "build_model",
    "build_network",
    "build_trained_network",
    "is_detector_recipe",
    "load_model_weights",
    "load_state_dict_exactly",
    "read_detector_state_dict",
    "state_dict_sizes",
]

# The predictor tensors whose shapes give a trained detector's class and keypoint counts (torchvision's names).
_CLASS_SCORE_KEY = "roi_heads.box_predictor.cls_score.weight"  # (num_classes, representation)
_KEYPOINT_SCORE_KEY = "roi_heads.keypoint_predictor.kps_score_lowres.weight"  # (in, num_keypoints, k, k)


def is_detector_recipe(model_cfg: DictConfig) -> bool:
    """Whether ``model_cfg.name`` names a detector (else a video model)."""
    return model_cfg.name in available("detection")


def build_network(
    model_cfg: DictConfig, *, num_classes: int | None = None, num_keypoints: int | None = None
) -> nn.Module:
    """The recipe's network at its initialisation; reads no file.

    Args:
        model_cfg: a recipe's ``model`` section, of either family.
        num_classes: detectors only: classes including background; None for torchvision's default. Video
            models take ``model_cfg.num_classes``.
        num_keypoints: detectors only: keypoints of a Keypoint R-CNN, unless ``model.overrides`` sets them.

    Returns:
        The network in training mode.
    """
    overrides = dict(OmegaConf.to_container(model_cfg.overrides, resolve=True))
    if not is_detector_recipe(model_cfg):
        return create(
            model_cfg.name, num_classes=int(model_cfg.num_classes), dropout=float(model_cfg.dropout), **overrides
        )
    if num_keypoints is not None:
        overrides.setdefault("num_keypoints", num_keypoints)
    return create(
        model_cfg.name,
        num_classes=num_classes,
        nonlocal_backbone=bool(model_cfg.nonlocal_backbone),
        nonlocal_head=model_cfg.nonlocal_head,
        nonlocal_mode=model_cfg.nonlocal_mode,
        nonlocal_norm=model_cfg.nonlocal_norm,
        nonlocal_zero_init=bool(model_cfg.nonlocal_zero_init),
        nonlocal_scale_mult=float(model_cfg.nonlocal_scale_mult),
        backbone_norm=model_cfg.backbone_norm,
        trainable_backbone_layers=model_cfg.trainable_backbone_layers,
        roi_canonical_scale=int(model_cfg.roi_canonical_scale),
        **overrides,
    )


def build_model(model_cfg: DictConfig, dataset: CocoDetection | None = None) -> nn.Module:
    """The recipe's network with the weight files the recipe names loaded into it.

    Video models: ``model.pretrained_2d`` is inflated into the network as it is built, then
    ``model.checkpoint`` (see :func:`load_model_weights`). Detectors: sized for ``dataset`` (its classes and,
    for keypoints, its keypoint names), then ``model.weights_backbone`` and ``model.weights``; the non-local
    blocks those files lack keep their identity initialisation (logged).

    Args:
        model_cfg: a recipe's ``model`` section, of either family.
        dataset: the detection dataset; required for a detector, ignored for a video model.

    Raises:
        ValueError: a detector recipe without a dataset, or a weight file that does not fit.
    """
    if not is_detector_recipe(model_cfg):
        return _build_video_model(model_cfg)
    if dataset is None:
        raise ValueError(f"detector {model_cfg.name!r} is sized by its dataset: pass dataset=")
    num_keypoints = len(dataset.keypoint_names) if dataset.task == "keypoints" else None
    model = build_network(model_cfg, num_classes=dataset.num_classes, num_keypoints=num_keypoints)
    if model_cfg.weights_backbone is not None:
        report = detection_models.load_backbone_state_dict(
            model, read_detector_state_dict(model_cfg.weights_backbone)
        )
        logger.info(
            "backbone weights from %s; at init: %s", model_cfg.weights_backbone, report.missing_nonlocal
        )
    if model_cfg.weights is not None:
        report = detection_models.load_detector_state_dict(
            model, read_detector_state_dict(model_cfg.weights), skip_mismatched=bool(model_cfg.skip_mismatched)
        )
        logger.info(
            "detector weights from %s; non-local keys at init: %d, skipped for shape: %s",
            model_cfg.weights,
            len(report.missing_nonlocal),
            report.skipped_mismatched,
        )
    return model


def _build_video_model(model_cfg: DictConfig) -> nn.Module:
    if model_cfg.pretrained_2d is not None:
        overrides = OmegaConf.to_container(model_cfg.overrides, resolve=True)
        model = create_pretrained(
            model_cfg.name,
            model_cfg.pretrained_2d,
            num_classes=int(model_cfg.num_classes),
            dropout=float(model_cfg.dropout),
            **overrides,
        )
    else:
        model = build_network(model_cfg)
    if model_cfg.checkpoint:
        load_model_weights(model, model_cfg.checkpoint)
    return model


def state_dict_sizes(model_cfg: DictConfig, state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The :func:`build_network` sizes that make the recipe's network fit ``state_dict``.

    A trained detector's class and keypoint counts come from its predictors' shapes, so no dataset is needed;
    a video model's come from the recipe, so this is empty for one.
    """
    if not is_detector_recipe(model_cfg):
        return {}
    sizes = {}
    if _CLASS_SCORE_KEY in state_dict:
        sizes["num_classes"] = int(state_dict[_CLASS_SCORE_KEY].shape[0])
    if _KEYPOINT_SCORE_KEY in state_dict:
        sizes["num_keypoints"] = int(state_dict[_KEYPOINT_SCORE_KEY].shape[1])
    return sizes


def load_model_weights(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Initialises ``model`` from an nlnet training checkpoint, a converted official model or a state dict.

    Tensors whose name is missing from the file, or whose shape differs (a 400-way classifier loaded into a
    157-way model), keep their initial values; both are reported. Official Caffe2 ``.pkl`` files are first
    converted with ``nlnet.weights.caffe2.convert_caffe2`` (its ``state_dict`` entry is what is read here).

    Returns:
        {"loaded": [...], "missing": [...], "shape_mismatch": [...], "unexpected": [...]} parameter names.
    """
    path = Path(path)
    if path.suffix == ".pkl":
        raise ValueError(
            f"{path}: Caffe2 .pkl files are not loaded directly; convert them with "
            "nlnet.weights.caffe2.convert_caffe2 and set model.checkpoint to the converted .pt file"
        )
    state = load_checkpoint(path)
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    if not is_state_dict(state):
        raise ValueError(f"{path}: expected a state dict of tensors (or a checkpoint with a 'model' entry)")
    own = model.state_dict()
    compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    report = {
        "loaded": sorted(compatible),
        "missing": sorted(k for k in own if k not in state),
        "shape_mismatch": sorted(k for k in state if k in own and own[k].shape != state[k].shape),
        "unexpected": sorted(k for k in state if k not in own),
    }
    if not compatible:
        raise ValueError(f"{path}: no tensor matches the model by name and shape")
    model.load_state_dict(compatible, strict=False)
    for key in ("missing", "shape_mismatch", "unexpected"):
        if report[key]:
            logger.warning("%s: %d %s tensors, e.g. %s", path, len(report[key]), key, report[key][:5])
    return report


def build_trained_network(model_cfg: DictConfig, checkpoint: str | Path) -> nn.Module:
    """The recipe's network with every tensor from ``checkpoint`` (testing and prediction need all of them).

    Raises:
        ValueError: the checkpoint lacks some of the model's tensors or has them in other shapes.
    """
    model = build_network(model_cfg)
    report = load_model_weights(model, checkpoint)
    if report["missing"] or report["shape_mismatch"]:
        raise ValueError(
            f"{checkpoint} does not fit model {model_cfg.name}: missing {report['missing'][:5]}, "
            f"shape mismatch {report['shape_mismatch'][:5]}"
        )
    return model


def read_detector_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file: a bare ``state_dict()`` or an nlnet detection checkpoint's ``model``."""
    state = load_checkpoint(path)
    if state.get("format") == DETECTION_CHECKPOINT_FORMAT:
        state = state["model"]
    if not is_state_dict(state):
        raise ValueError(f"{path}: expected a state dict of tensors or an nlnet detection checkpoint")
    return state


def load_state_dict_exactly(model: nn.Module, state_dict: Mapping[str, Any], source: str | Path) -> None:
    """Loads every tensor of ``model`` from ``state_dict``, for uses where a half-loaded model would mislead.

    Entries of ``state_dict`` that the model lacks are ignored.

    Raises:
        ValueError: ``state_dict`` holds something other than tensors, or lacks a tensor of the model or has
            it in another shape.
    """
    if not is_state_dict(state_dict):
        raise ValueError(f"{source}: expected a state dict of tensors (or a checkpoint with a 'model' entry)")
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    mismatched = sorted(k for k in own if k in state_dict and state_dict[k].shape != own[k].shape)
    if missing or mismatched:
        raise ValueError(
            f"{source} does not fit the model: {len(missing)} tensors missing (e.g. {missing[:3]}), "
            f"{len(mismatched)} of another shape (e.g. {mismatched[:3]}); check the recipe (config, model name)"
        )
    model.load_state_dict({k: state_dict[k] for k in own})
