"""`create(name, **overrides)` and `available()`: the one registry of video models and detectors.

Video models are built here from a preset row; detector names are ``nlnet.models.detection``'s presets, and
`create` hands them to that family's builder, ``nlnet.models.detection.create``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from nlnet.layers import NonLocalBlock
from nlnet.layers.nonlocal_block import EXTENTS, IMPLS, MODES
from nlnet.models import detection
from nlnet.models.presets import (
    CLIPS,
    INFLATIONS,
    PRESETS,
    STAGE_BLOCKS,
    STAGES,
    STYLES,
    resolve_nonlocal_positions,
)
from nlnet.models.resnet3d import ResNet3d

FAMILIES = ("video", "detection")

_DEFAULTS = {
    "stage_blocks": None,
    "base_width": 64,
    "nonlocal_blocks": "preset",
    "nonlocal_mode": "embedded_gaussian",
    "nonlocal_extent": "spacetime",
    "nonlocal_norm": "bn",
    "nonlocal_pool": (1, 2, 2),
    "nonlocal_temporal_groups": None,
    "nonlocal_impl": "auto",
    "clip": "preset",
    "dropout": 0.5,
}


def available(family: str | None = None) -> list[str]:
    """Names accepted by `create`, sorted: every model, or those of one of `FAMILIES`."""
    if family is None:
        return sorted([*PRESETS, *detection.available()])
    if family == "video":
        return sorted(PRESETS)
    if family == "detection":
        return detection.available()
    raise ValueError(f"family must be one of {FAMILIES} or None, got {family!r}")


def create(name: str, num_classes: int | None = None, **overrides) -> nn.Module:
    """Build one of the paper's video models or detectors.

    Detectors (``available("detection")``) are built by ``nlnet.models.detection.create``, which documents
    their arguments; ``num_classes`` None is then torchvision's default. The rest of this documents the
    video models (``available("video")``).

    Args:
        name: one of `available()`: c2d_r50, c2d_r101, i3d_r50, i3d_r101 (I3D3x1x1), i3d3x3x3_r50,
            i3d3x3x3_r101, nl_c2d_r50, nl_c2d_r101, nl_i3d_r50, nl_i3d_r101 (5 non-local blocks),
            i3d_r50_mmaction2, nl_i3d_r50_mmaction2 (mmaction2's variant: `presets.STYLES`), or a detector.
        num_classes: classifier outputs (None: 400, for Kinetics-400).
        **overrides: any of
            stage_blocks: blocks per res2..res5 (default from the depth: (3, 4, 6, 3) or (3, 4, 23, 3)).
            base_width: stem width, stage widths scale with it (default 64).
            nonlocal_blocks: None/"0", "1", "5", "10", "res2".."res5", or {stage: [block indices]}
                (default: the preset's, "5" for nl_* and none otherwise).
            nonlocal_mode: "gaussian", "embedded_gaussian" (default), "dot_product", "concatenation".
            nonlocal_extent: "spacetime" (default), "space", "time".
            nonlocal_norm: "bn" (default) or None.
            nonlocal_pool: max-pool kernel for keys/values, default (1, 2, 2); None turns it off.
            nonlocal_temporal_groups: {stage: frames} to attend within groups of consecutive frames, as the
                official frozen-BN long-clip (128x1, 32x4) models do at res3 ({"res3": 4}); default None.
            nonlocal_impl: "auto" (default, the memory-lean exact kernels) or "explicit" (the N×M weights
                built literally, as the paper's implementation does).
            clip: "32x2" (the paper's stem, the default), "8x8" (temporal stride 1 stem) or "32x2_mmaction2"
                (the default of the *_mmaction2 models).
            dropout: dropout before the classifier (default 0.5).
            ImageNet weights are not an override: models read no files, and
            ``nlnet.weights.create_pretrained(name, path, ...)`` builds a model with them inflated.

    Returns:
        The network in training mode; forward (B, 3, T, H, W) -> (B, num_classes).

    Raises:
        ValueError: on an unknown name, override or override value.
    """
    if name in detection.available():
        return detection.create(name, num_classes, **overrides)
    if "pretrained_2d" in overrides:
        raise ValueError(
            "nlnet.models.create reads no files and takes no pretrained_2d; use "
            "nlnet.weights.create_pretrained(name, path, ...) or nlnet.weights.load_2d(model, path)"
        )
    return _create_video_model(name, 400 if num_classes is None else num_classes, **overrides)


def _create_video_model(name: str, num_classes: int, **overrides) -> ResNet3d:
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    unknown = sorted(set(overrides) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown overrides {unknown}; allowed: {', '.join(_DEFAULTS)}")
    options = {**_DEFAULTS, **overrides}
    preset = PRESETS[name]
    style = STYLES[preset.style]
    if options["clip"] == "preset":
        options["clip"] = style.clip

    stage_blocks = tuple(options["stage_blocks"] or STAGE_BLOCKS[preset.depth])
    if len(stage_blocks) != 4 or any(int(blocks) < 1 for blocks in stage_blocks):
        raise ValueError(f"stage_blocks must be 4 positive block counts (res2..res5), got {stage_blocks}")
    if int(options["base_width"]) < 2:
        raise ValueError(f"base_width must be an integer >= 2, got {options['base_width']!r}")
    if options["clip"] not in CLIPS:
        raise ValueError(f"clip must be one of {sorted(CLIPS)}, got {options['clip']!r}")
    if not 0.0 <= float(options["dropout"]) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {options['dropout']!r}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes!r}")
    for key, allowed in (
        ("nonlocal_mode", MODES),
        ("nonlocal_extent", EXTENTS),
        ("nonlocal_norm", ("bn", None)),
        ("nonlocal_impl", IMPLS),
    ):
        if options[key] not in allowed:
            raise ValueError(f"{key} must be one of {allowed}, got {options[key]!r}")

    pool = options["nonlocal_pool"]
    if pool is not None:
        if isinstance(pool, str) or len(tuple(pool)) != 3 or any(int(size) < 1 for size in pool):
            raise ValueError(f"nonlocal_pool must be None or 3 positive ints (T, H, W), got {pool!r}")
        pool = tuple(int(size) for size in pool)
    groups = options["nonlocal_temporal_groups"]
    if groups is not None:
        given = groups
        groups = {f"res{stage}" if isinstance(stage, int) else stage: size for stage, size in dict(given).items()}
        valid_sizes = all(isinstance(size, int) and size >= 1 for size in groups.values())
        if not set(groups) <= set(STAGES) or not valid_sizes:
            raise ValueError(f"nonlocal_temporal_groups must map stages {STAGES} to positive ints, got {given!r}")
    layout = preset.nonlocal_blocks if options["nonlocal_blocks"] == "preset" else options["nonlocal_blocks"]
    inflation = INFLATIONS[preset.inflation]
    return ResNet3d(
        stage_blocks=stage_blocks,
        base_width=int(options["base_width"]),
        stem_kernel=inflation.stem,
        first_kernels=inflation.kernels("first_conv", stage_blocks),
        middle_kernels=inflation.kernels("middle_conv", stage_blocks),
        clip=CLIPS[options["clip"]],
        nonlocal_positions=resolve_nonlocal_positions(layout, preset.depth, stage_blocks),
        nonlocal_options={
            "dim": 3,
            "mode": options["nonlocal_mode"],
            "extent": options["nonlocal_extent"],
            "norm": options["nonlocal_norm"],
            "pool": pool,
            "pool_position": style.nonlocal_pool_position,
            "scale": style.nonlocal_scale,
            "impl": options["nonlocal_impl"],
        },
        nonlocal_temporal_groups=groups,
        num_classes=int(num_classes),
        dropout=float(options["dropout"]),
        head_pool=style.head_pool,
    )


def nonlocal_blocks(model: nn.Module) -> dict[str, NonLocalBlock]:
    """The non-local blocks of ``model`` by qualified name ("res3.1.nonlocal_block"), in forward order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, NonLocalBlock)}


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode counts the CUDA attention kernels but not the CPU flash kernel that
    # scaled_dot_product_attention uses on the CPU: (B, H, N, d) queries, (B, H, M, d) keys, (B, H, M, dv)
    # values -> q·kᵀ (N·M·d MACs) plus weights·v (N·M·dv MACs), 2 FLOPs per MAC.
    batch, heads, queries, head_dim = query_shape
    keys, value_dim = key_shape[2], value_shape[3]
    return 2 * batch * heads * queries * keys * (head_dim + value_dim)


_EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


@dataclass(frozen=True)
class ModelInfo:
    """Size and cost of one model on one clip shape.

    Attributes:
        name: the preset name.
        params: number of parameters.
        macs: multiply-adds of one forward pass (FLOPs / 2, as the paper counts), convolutions, fc and the
            non-local matrix products; batch norm, pooling and softmax are not counted.
        input_shape: (C, T, H, W) of the clip.
        nonlocal_inputs: {qualified block name: (C, T, H, W) of its input}, in forward order.
    """

    name: str
    params: int
    macs: int
    input_shape: tuple[int, ...]
    nonlocal_inputs: dict[str, tuple[int, ...]]

    def summary(self) -> str:
        """Human-readable lines: parameters, GMACs and where each non-local block sits."""
        clip = "x".join(str(size) for size in self.input_shape)
        lines = [
            f"model       {self.name}",
            f"parameters  {self.params / 1e6:.2f}M ({self.params:,})",
            f"GMACs       {self.macs / 1e9:.2f} per {clip} clip (FLOPs / 2)",
            f"non-local   {len(self.nonlocal_inputs)} block(s)",
        ]
        for block, shape in self.nonlocal_inputs.items():
            position = block.removesuffix(".nonlocal_block").replace(".", " after block ", 1)
            lines.append(f"  {position:<24} input {'x'.join(str(size) for size in shape)}")
        return "\n".join(lines)


def describe(
    name: str, num_classes: int = 400, input_shape: tuple[int, ...] = (3, 32, 224, 224), **overrides
) -> ModelInfo:
    """Count parameters and multiply-adds of a model without computing anything.

    The model and a clip of ``input_shape`` are fake tensors (shapes only), so this takes about a second even
    for R101 on a 32 x 224 x 224 clip; `torch.utils.flop_counter.FlopCounterMode` counts the FLOPs.

    Args:
        name: a video model's name from `available("video")`.
        num_classes: classifier outputs.
        input_shape: (C, T, H, W) of one clip; batch 1.
        **overrides: as for `create`, except pretrained_2d.

    Returns:
        The counts and the non-local block positions.
    """
    if overrides.get("pretrained_2d") is not None:
        raise ValueError("describe counts an uninitialised model; pretrained_2d makes no difference to it")
    if name in detection.available():
        raise ValueError(f"describe counts video models; {name!r} is a detector")
    inputs: dict[str, tuple[int, ...]] = {}
    # Fake tensors carry shapes and the real device (so the same kernels are dispatched as on the CPU) but no
    # data: nothing is allocated or computed.
    with FakeTensorMode():
        model = create(name, num_classes, **overrides).eval()
        for key, block in nonlocal_blocks(model).items():
            block.register_forward_pre_hook(
                lambda module, args, key=key: inputs.__setitem__(key, tuple(args[0].shape[1:]))
            )
        clip = torch.empty(1, *input_shape)
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
            model(clip)
        params = sum(parameter.numel() for parameter in model.parameters())
    return ModelInfo(name, params, counter.get_total_flops() // 2, tuple(input_shape), inputs)
