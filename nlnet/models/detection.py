"""torchvision's Mask R-CNN and Keypoint R-CNN (ResNet-FPN) with the paper's non-local blocks (§6).

Wang et al. put one 2D non-local block in the backbone "right before the last residual block of res4" and,
for keypoints, four more in the head, one after every two of its eight convolutions. No code was released for
this part, so the detectors here are torchvision's own, built exactly as ``maskrcnn_resnet50_fpn`` /
``keypointrcnn_resnet50_fpn`` build them, with the blocks spliced into two ``nn.Sequential`` containers:

- res4 is torchvision's ``layer3``; the block goes between ``layer3[-2]`` and ``layer3[-1]`` (R50: after
  index 4 of 0..5, R101: after index 21 of 0..22) under the child name ``nonlocal_after_4`` /
  ``nonlocal_after_21``;
- the keypoint head's children are ``0..15`` (conv, relu, conv, relu, ...); the blocks follow relus
  ``3, 7, 11, 15``, i.e. convs 2, 4, 6 and 8.

Positions after the block shift by one (``layer3[5]`` is then the non-local block; ``getattr(layer3, "5")``
is the last residual block), names do not: every original child keeps its name, so a torchvision detector's
state dict loads key for key and reports only the ``nonlocal_after_*`` parameters as missing. The blocks start
as the identity (BN with γ = 0), which is why a trained detector gives the same detections with them inserted.

Norms. torchvision freezes the backbone's BN when it starts from pre-trained weights, because two images per
device give poor batch statistics (``backbone_norm="frozen_bn"``). By default the block has its own BN after
W_z, a plain ``nn.BatchNorm2d`` with γ = 0 (frozen at γ = 0 it would stay the identity for ever); the paper does
not say what it used. Its statistics span every position of the batch, but for a feature of the whole image
(and a non-local block's output is close to one) they span two images only, and BN turns the feature into its
difference to the other image of the batch: in evaluation, with running statistics, the same image reads
differently. ``nonlocal_norm=None`` drops that BN and starts W_z at zero, as the official video code does for
its two-clips-a-GPU models; ``backbone_norm="gn"`` (GroupNorm, 32 groups) does the same for the backbone when it
trains from scratch, as He et al. did (*Rethinking ImageNet Pre-training*, 2019). The built-in context recipe
uses both; with BN in the backbone neither detector learnt the class there.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torchvision.models.convnext import LayerNorm2d
from torchvision.models.detection import KeypointRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from nlnet.layers import NonLocalBlock

__all__ = [
    "DetectorPreset",
    "LoadReport",
    "available",
    "create",
    "load_backbone_state_dict",
    "load_detector_state_dict",
    "nonlocal_blocks",
]

NONLOCAL_PREFIX = "nonlocal_after_"


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels)


# "ln": each position's channels normalised on their own (ConvNeXt's LayerNorm2d), so that, as with frozen BN,
# nothing but the convolutions carries information across the image; GN's statistics span the whole image.
BACKBONE_NORMS = {"bn": nn.BatchNorm2d, "frozen_bn": FrozenBatchNorm2d, "gn": _group_norm, "ln": LayerNorm2d}


@dataclass(frozen=True)
class DetectorPreset:
    """One detector of the paper's §6, as data.

    Attributes:
        kind: "mask" (Mask R-CNN) or "keypoint" (Keypoint R-CNN).
        depth: ResNet depth of the backbone (50 or 101).
        res4_blocks: number of residual blocks in res4 (torchvision's ``layer3``).
        head_nonlocal_after_convs: 1-based indices of head convolutions followed by a block (keypoint head).
        default_num_classes: torchvision's default number of classes, background included.
    """

    kind: str
    depth: int
    res4_blocks: int
    head_nonlocal_after_convs: tuple[int, ...] = field(default=())
    default_num_classes: int = 91

    @property
    def backbone_nonlocal_after(self) -> int:
        """0-based index of the res4 block the backbone block follows: the one before the last."""
        return self.res4_blocks - 2


_PRESETS: dict[str, DetectorPreset] = {
    "maskrcnn_r50_fpn": DetectorPreset(kind="mask", depth=50, res4_blocks=6),
    "maskrcnn_r101_fpn": DetectorPreset(kind="mask", depth=101, res4_blocks=23),
    "keypointrcnn_r50_fpn": DetectorPreset(
        kind="keypoint",
        depth=50,
        res4_blocks=6,
        head_nonlocal_after_convs=(2, 4, 6, 8),
        default_num_classes=2,
    ),
}


def available() -> list[str]:
    """Names accepted by :func:`create`."""
    return sorted(_PRESETS)


def preset(name: str) -> DetectorPreset:
    """The :class:`DetectorPreset` behind ``name``; ValueError for an unknown name."""
    if name not in _PRESETS:
        raise ValueError(f"unknown detector {name!r}; expected one of {available()}")
    return _PRESETS[name]


def create(
    name: str,
    num_classes: int | None = None,
    *,
    nonlocal_backbone: bool = True,
    nonlocal_head: bool | None = None,
    nonlocal_mode: str = "embedded_gaussian",
    nonlocal_norm: str | None = "bn",
    nonlocal_zero_init: bool = True,
    nonlocal_scale_mult: float = 1.0,
    backbone_norm: str = "bn",
    trainable_backbone_layers: int | None = None,
    roi_canonical_scale: int = 224,
    **kwargs,
) -> MaskRCNN | KeypointRCNN:
    """Build a torchvision detector with the paper's non-local blocks.

    The network is what torchvision's builder makes (``resnet_fpn_backbone`` + ``MaskRCNN``/``KeypointRCNN``),
    without downloading anything: weights come through :func:`load_detector_state_dict` or
    :func:`load_backbone_state_dict`.

    Args:
        name: one of :func:`available`.
        num_classes: classes including background; torchvision's default (91, or 2 for keypoints) if None.
        nonlocal_backbone: put one block before the last residual block of res4.
        nonlocal_head: put four blocks in the keypoint head, one after every two convolutions; defaults to
            True for the keypoint model; True for a Mask R-CNN is a ValueError (the paper has no such model).
        nonlocal_mode: the block's pairwise function ("embedded_gaussian", "gaussian", "dot_product",
            "concatenation"). Sub-sampling is the paper's 2x2 max-pool.
        nonlocal_norm: "bn" for a BN after W_z that starts at γ = 0 (the paper); None for no norm and a W_z
            that starts at zero (the official code's choice when BN is frozen and a device holds two clips).
        nonlocal_zero_init: start each block as the identity (γ = 0, or W_z = 0 without a norm). False, only
            without a norm: W_z starts like every other convolution of torchvision's ResNet (Kaiming normal,
            fan-out), for a detector trained from scratch, where there is no trained network to preserve.
        nonlocal_scale_mult: softmax modes only: multiplies the dot products' scale d^-0.5 (the released
            models'); above 1 the attention starts sharper, closer to the few positions most like the query.
        backbone_norm: the backbone's normalisation: "bn", trainable BatchNorm2d with batch statistics;
            "frozen_bn", torchvision's ``FrozenBatchNorm2d``, as torchvision has it when it starts from
            pre-trained weights; "gn", GroupNorm with 32 groups, for training from scratch with a few images per
            device (He et al., *Rethinking ImageNet Pre-training*, 2019), where batch statistics over two images
            make every whole-image feature relative to the other image of the batch.
            "ln", ConvNeXt's ``LayerNorm2d``: each position on its own, so only convolutions span the image.
        trainable_backbone_layers: how many of torchvision's five backbone stages train (0-5); 3 with frozen
            BN, 5 otherwise, as in torchvision. The non-local blocks always train.
        roi_canonical_scale: the RoI size that FPN maps to P4 (k0 = 4 in Lin et al.'s
            k = k0 + log2(sqrt(wh) / 224)); each halving moves a RoI one level finer. 224, torchvision's and the
            FPN paper's, suits 800-px images; for smaller ones scale it with the image (32 at 112 px puts 16-px
            objects on P3 instead of P2). The box, mask and keypoint heads all pool with it.
        **kwargs: passed to ``MaskRCNN``/``KeypointRCNN`` (``min_size``, ``max_size``, ``num_keypoints``,
            ``box_detections_per_img``, ...).

    Returns:
        The detector. In training ``model(images, targets)`` returns the loss dict; in evaluation it returns
        one dict per image with boxes (N, 4), labels (N,), scores (N,) and masks (N, 1, H, W) or keypoints
        (N, K, 3).
    """
    spec = preset(name)
    if nonlocal_head is None:
        nonlocal_head = spec.kind == "keypoint"
    if nonlocal_head and spec.kind != "keypoint":
        raise ValueError(f"nonlocal_head applies to the keypoint head; {name!r} has none (got nonlocal_head=True)")
    _check_block_options(nonlocal_mode, nonlocal_norm, nonlocal_zero_init, nonlocal_scale_mult, backbone_norm)
    block_options = {"mode": nonlocal_mode, "norm": nonlocal_norm, "zero_init": nonlocal_zero_init}
    make_block = functools.partial(_make_block, scale_mult=nonlocal_scale_mult, **block_options)
    num_classes, trainable_layers = _resolve_counts(spec, num_classes, trainable_backbone_layers, backbone_norm)

    backbone = resnet_fpn_backbone(
        backbone_name=f"resnet{spec.depth}",
        weights=None,
        norm_layer=BACKBONE_NORMS[backbone_norm],
        trainable_layers=trainable_layers,
    )
    detector_class = MaskRCNN if spec.kind == "mask" else KeypointRCNN
    model = detector_class(backbone, num_classes=num_classes, **_roi_pools(spec, roi_canonical_scale, kwargs))

    if nonlocal_backbone:
        _add_backbone_block(model, spec, make_block)
    if nonlocal_head:
        _add_keypoint_head_blocks(model, spec, make_block)
    return model


def _check_block_options(
    mode: str, norm: str | None, zero_init: bool, scale_mult: float, backbone_norm: str
) -> None:
    if not zero_init and norm is not None:
        raise ValueError(
            f"nonlocal_zero_init=False needs nonlocal_norm=None (a norm after W_z starts at γ = 0), "
            f"got nonlocal_norm={norm!r}"
        )
    if not (isinstance(scale_mult, (int, float)) and scale_mult > 0):
        raise ValueError(f"nonlocal_scale_mult must be a positive number, got {scale_mult!r}")
    if scale_mult != 1 and mode not in ("gaussian", "embedded_gaussian"):
        raise ValueError(
            f"nonlocal_scale_mult scales a softmax, which nonlocal_mode={mode!r} has not "
            f"(got nonlocal_scale_mult={scale_mult})"
        )
    if backbone_norm not in BACKBONE_NORMS:
        raise ValueError(f"backbone_norm must be one of {sorted(BACKBONE_NORMS)}, got {backbone_norm!r}")


# torchvision's pooled sizes: 7 x 7 for the box head, 14 x 14 for the mask and keypoint heads.
_ROI_POOLS = {"box_roi_pool": 7, "mask_roi_pool": 14, "keypoint_roi_pool": 14}


def _roi_pools(spec: DetectorPreset, canonical_scale: int, kwargs: dict) -> dict:
    """``kwargs`` with the heads' ``MultiScaleRoIAlign`` at ``canonical_scale`` when it is not torchvision's 224."""
    if isinstance(canonical_scale, bool) or not (isinstance(canonical_scale, int) and canonical_scale > 0):
        raise ValueError(f"roi_canonical_scale must be a positive integer, got {canonical_scale!r}")
    if canonical_scale == 224:
        return kwargs
    pools = ["box_roi_pool", "mask_roi_pool" if spec.kind == "mask" else "keypoint_roi_pool"]
    given = [key for key in pools if kwargs.get(key) is not None]
    if given:
        raise ValueError(f"roi_canonical_scale={canonical_scale} builds {given}; pass one or the other, not both")
    return kwargs | {
        key: MultiScaleRoIAlign(["0", "1", "2", "3"], _ROI_POOLS[key], 2, canonical_scale=canonical_scale)
        for key in pools
    }


def _resolve_counts(
    spec: DetectorPreset, num_classes: int | None, trainable_layers: int | None, backbone_norm: str
) -> tuple[int, int]:
    """``num_classes`` and ``trainable_backbone_layers`` with torchvision's defaults filled in, checked."""
    if trainable_layers is None:
        trainable_layers = 3 if backbone_norm == "frozen_bn" else 5
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be in 0..5, got {trainable_layers}")
    if num_classes is None:
        num_classes = spec.default_num_classes
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    return num_classes, trainable_layers


def nonlocal_blocks(model: nn.Module) -> dict[str, NonLocalBlock]:
    """The non-local blocks of ``model`` by qualified module name, in forward order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, NonLocalBlock)}


@dataclass
class LoadReport:
    """What a state-dict load left at initialisation.

    Attributes:
        missing_nonlocal: parameters/buffers of non-local blocks absent from the file (identity init kept).
        skipped_mismatched: keys present in both whose shapes differ, left at init (``skip_mismatched=True``).
    """

    missing_nonlocal: list[str]
    skipped_mismatched: list[str]


def load_detector_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, skip_mismatched: bool = False
) -> LoadReport:
    """Load a torchvision-format detector state dict (e.g. a COCO-trained Mask R-CNN) into ``model``.

    Matching is strict except for the non-local blocks, which keep their identity initialisation, and BN
    ``num_batches_tracked`` counters (absent from frozen-BN files).

    Args:
        model: a detector from :func:`create` (with or without non-local blocks).
        state_dict: the torchvision detector's ``state_dict()``.
        skip_mismatched: leave keys whose shape differs at init (a predictor trained for another number of
            classes or keypoints) instead of raising.

    Returns:
        A :class:`LoadReport`.

    Raises:
        ValueError: keys that the model lacks, model keys missing from the file (other than the above), or
            shape mismatches when ``skip_mismatched`` is False.
    """
    own = model.state_dict()
    mismatched = sorted(k for k, v in state_dict.items() if k in own and own[k].shape != v.shape)
    if mismatched and not skip_mismatched:
        shapes = ", ".join(
            f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched
        )
        raise ValueError(
            f"shape mismatch for {len(mismatched)} keys ({shapes}); pass skip_mismatched=True to skip"
        )
    to_load = {k: v for k, v in state_dict.items() if k not in mismatched}
    result = model.load_state_dict(to_load, strict=False)
    missing_nonlocal = [k for k in result.missing_keys if _is_nonlocal_key(k)]
    missing_other = [
        k
        for k in result.missing_keys
        if not _is_nonlocal_key(k) and not k.endswith("num_batches_tracked") and k not in mismatched
    ]
    if result.unexpected_keys or missing_other:
        raise ValueError(
            "state dict does not match the detector: "
            f"unexpected keys {result.unexpected_keys[:10]} ({len(result.unexpected_keys)} in all), "
            f"missing keys {missing_other[:10]} ({len(missing_other)} in all)"
        )
    return LoadReport(missing_nonlocal=missing_nonlocal, skipped_mismatched=mismatched)


def load_backbone_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> LoadReport:
    """Load a torchvision-format ImageNet ResNet state dict (``resnet50().state_dict()``) into the backbone.

    The classifier (``fc.*``) is dropped; everything else must match the backbone body key for key, apart from
    the non-local blocks and BN counters.

    Args:
        model: a detector from :func:`create`.
        state_dict: the ResNet's ``state_dict()``.

    Returns:
        A :class:`LoadReport` whose ``missing_nonlocal`` lists the backbone block's keys.

    Raises:
        ValueError: keys that do not belong to the backbone, or backbone keys missing from the file.
    """
    body = model.backbone.body
    own = body.state_dict()
    # torchvision's ResNet keeps fc after layer4, the FPN body stops at layer4; frozen BN keeps no counters
    backbone_state = {
        k: v
        for k, v in state_dict.items()
        if not k.startswith("fc.") and not (k.endswith("num_batches_tracked") and k not in own)
    }
    unexpected = sorted(k for k in backbone_state if k not in own)
    mismatched = sorted(k for k in backbone_state if k in own and own[k].shape != backbone_state[k].shape)
    missing = sorted(
        k
        for k in own
        if k not in backbone_state and not _is_nonlocal_key(k) and not k.endswith("num_batches_tracked")
    )
    if unexpected or missing or mismatched:
        raise ValueError(
            "not a torchvision ResNet state dict for this backbone: "
            f"unexpected {unexpected[:10]}, missing {missing[:10]}, shape mismatch {mismatched[:10]}"
        )
    body.load_state_dict(backbone_state, strict=False)
    missing_nonlocal = [f"backbone.body.{k}" for k in own if _is_nonlocal_key(k)]
    return LoadReport(missing_nonlocal=missing_nonlocal, skipped_mismatched=[])


def _add_backbone_block(
    model: MaskRCNN | KeypointRCNN, spec: DetectorPreset, make_block: Callable[[int], NonLocalBlock]
) -> None:
    """Insert the preset's non-local block into res4 (torchvision's ``layer3``) of the backbone body."""
    body = model.backbone.body
    res4 = body["layer3"]
    if len(res4) != spec.res4_blocks:
        raise RuntimeError(f"torchvision's res4 has {len(res4)} blocks, the preset expects {spec.res4_blocks}")
    channels = res4[-1].conv3.out_channels
    body["layer3"] = _insert_after(res4, {spec.backbone_nonlocal_after: make_block(channels)})


def _add_keypoint_head_blocks(
    model: KeypointRCNN, spec: DetectorPreset, make_block: Callable[[int], NonLocalBlock]
) -> None:
    """Insert the preset's non-local blocks into the keypoint head, each after the numbered convolution."""
    head = model.roi_heads.keypoint_head
    convs = [index for index, module in enumerate(head) if isinstance(module, nn.Conv2d)]
    blocks = {}
    for conv_number in spec.head_nonlocal_after_convs:
        conv_index = convs[conv_number - 1]
        # the block reads the conv's activated output, so it follows the ReLU right after the conv
        blocks[conv_index + 1] = make_block(head[conv_index].out_channels)
    model.roi_heads.keypoint_head = _insert_after(head, blocks)


def _make_block(channels: int, *, mode: str, norm: str | None, zero_init: bool, scale_mult: float) -> NonLocalBlock:
    block = NonLocalBlock(channels, dim=2, mode=mode, pool="default", norm=norm)
    block.scale_factor *= scale_mult  # the block's own d^-0.5, for whichever d its mode compares
    if not zero_init:  # W_z (no norm after it) drawn like torchvision's ResNet convolutions
        nn.init.kaiming_normal_(block.out.weight, mode="fan_out", nonlinearity="relu")
    return block


def _is_nonlocal_key(key: str) -> bool:
    return any(part.startswith(NONLOCAL_PREFIX) for part in key.split("."))


def _insert_after(sequence: nn.Sequential, blocks: Mapping[int, nn.Module]) -> nn.Sequential:
    """A copy of ``sequence`` with ``blocks[i]`` after child ``i``; original children keep their names."""
    children: OrderedDict[str, nn.Module] = OrderedDict()
    for index, (child_name, child) in enumerate(sequence.named_children()):
        children[child_name] = child
        if index in blocks:
            children[f"{NONLOCAL_PREFIX}{child_name}"] = blocks[index]
    if len(children) != len(sequence) + len(blocks):
        raise ValueError(f"positions {sorted(blocks)} outside a sequence of {len(sequence)} modules")
    return nn.Sequential(children)
