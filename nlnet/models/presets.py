"""The paper's video models as data (Wang et al., CVPR 2018, Table 1, Table 2 and the official Caffe2 code).

Every C2D / I3D ResNet of the paper differs from the others only in numbers: blocks per stage, which
convolutions are inflated over time, where non-local blocks go, and how the stem treats time. Those numbers
live here; `nlnet.models.registry` reads them and `nlnet.models.resnet3d.ResNet3d` builds the network.
Adding a model is adding a row to `PRESETS`.

Source of the numbers where the paper is silent: the official Caffe2 code `video-nonlocal-net`
(`resnet_video_org.py` for the paper's 32x2 clips, `resnet_video.py` for 8x8 clips, `obtain_arc` for the
inflation pattern, `res_stage_nonlocal` for the non-local positions).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

STAGES = ("res2", "res3", "res4", "res5")

# Blocks per stage (res2..res5) for each depth.
STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


@dataclass(frozen=True)
class Inflation:
    """Temporal kernel sizes of one architecture family.

    Attributes:
        stem: temporal kernel of conv1 (1 for C2D, 5 for I3D).
        first_conv: per stage, a pattern tiled over that stage's blocks giving the temporal kernel of the
            bottleneck's first 1x1 convolution (3 turns it into 3x1x1).
        middle_conv: the same for the bottleneck's 3x3 convolution (3 turns it into 3x3x3).
    """

    stem: int
    first_conv: tuple[tuple[int, ...], ...]
    middle_conv: tuple[tuple[int, ...], ...]

    def kernels(self, which: str, stage_blocks: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """Tile the per-stage pattern of ``which`` ("first_conv" or "middle_conv") over ``stage_blocks``."""
        patterns = getattr(self, which)
        return tuple(
            tuple(pattern[index % len(pattern)] for index in range(blocks))
            for pattern, blocks in zip(patterns, stage_blocks, strict=True)
        )


_FLAT = ((1,), (1,), (1,), (1,))
# One inflated kernel for every two residual blocks, in the official pattern: all res2 blocks, res3 {0, 2},
# even res4 blocks, res5 {1} (VNL `obtain_arc`; PySlowFast `_TEMPORAL_KERNEL_BASIS["i3d"]`).
_I3D_PATTERN = ((3,), (3, 1), (3, 1), (1, 3))

INFLATIONS = {
    "c2d": Inflation(stem=1, first_conv=_FLAT, middle_conv=_FLAT),
    "i3d": Inflation(stem=5, first_conv=_I3D_PATTERN, middle_conv=_FLAT),
    # The paper's I3D3x3x3 (Table 2e); the official code has no such model, so it inflates the 3x3 in the
    # same blocks where I3D3x1x1 inflates the first 1x1.
    "i3d3x3x3": Inflation(stem=5, first_conv=_FLAT, middle_conv=_I3D_PATTERN),
}


@dataclass(frozen=True)
class Clip:
    """How the stem treats time for one clip format.

    Attributes:
        stem_stride: temporal stride of conv1.
        pool1_kernel: (T, H, W) kernel of the max-pool after conv1.
        pool1_stride: its stride; None is (T, 2, 2), the kernel's own length in time.
        pool1_padding: its padding; the official models pad nothing.
    """

    stem_stride: int
    pool1_kernel: tuple[int, int, int]
    pool1_stride: tuple[int, int, int] | None = None
    pool1_padding: tuple[int, int, int] = (0, 0, 0)


CLIPS = {
    # The paper's 32 frames, every 2nd: conv1 temporal stride 2, pool1 2x3x3 stride 2 (VNL resnet_video_org).
    "32x2": Clip(stem_stride=2, pool1_kernel=(2, 3, 3)),
    # 8 frames every 8th: no temporal down-sampling in the stem (VNL resnet_video, PySlowFast).
    "8x8": Clip(stem_stride=1, pool1_kernel=(1, 3, 3)),
    # mmaction2's I3D for 32x2 clips (`ResNet3d` with pool1_stride_t=2): pool1 1x3x3 stride 2 padded (0, 1, 1),
    # so it drops every other frame instead of taking the max over two, and 224 -> 56 in res2.
    # PySlowFast's ResNet for 8x8 clips (`ResNetBasicStem`): pool1 1x3x3 stride (1, 2, 2) padded (0, 1, 1).
    "8x8_pyslowfast": Clip(stem_stride=1, pool1_kernel=(1, 3, 3), pool1_stride=(1, 2, 2), pool1_padding=(0, 1, 1)),
    "32x2_mmaction2": Clip(stem_stride=2, pool1_kernel=(1, 3, 3), pool1_stride=(2, 2, 2), pool1_padding=(0, 1, 1)),
}


@dataclass(frozen=True)
class Style:
    """How one code base builds the same named network, where it departs from the official Caffe2 code.

    Attributes:
        clip: the default key of `CLIPS`.
        head_pool: "fixed" (the official [T, 7, 7] stride-1 average pool) or "global" (adaptive average pool
            to 1 x 1 x 1; the same on a 224 x 224 input, different on larger ones).
        nonlocal_pool_position: "before" or "after" φ and g (see `nlnet.NonLocalBlock`).
        nonlocal_scale: whether the embedded-Gaussian dot products are scaled by d^-0.5.
    """

    clip: str
    head_pool: str
    nonlocal_pool_position: str
    nonlocal_scale: bool


STYLES = {
    "official": Style(clip="32x2", head_pool="fixed", nonlocal_pool_position="before", nonlocal_scale=True),
    # mmaction2 1.x `configs/recognition/i3d` (backbone ResNet3d, mmcv NonLocal3d with use_scale=False, I3DHead).
    # Its NL output conv has no bias; a bias before the block's BN changes nothing, so nlnet keeps it at 0.
    "mmaction2": Style(
        clip="32x2_mmaction2", head_pool="global", nonlocal_pool_position="after", nonlocal_scale=False
    ),
}

# Non-local layouts by name, per depth: stage -> (step, offset) selects the blocks i with i % step == offset,
# the block is placed after block i. "5" is the official layout (VNL `res_stage_nonlocal`: res3 {1, 3};
# res4 {1, 3, 5} on R50 and {6, 13, 20} on R101). "10" is every block of res3 and res4 on R50; for R101 the
# paper gives no indices, so all of res3 plus six evenly spaced res4 blocks ending with the last one.
NONLOCAL_LAYOUTS: dict[int, dict[str, dict[str, tuple[int, int]]]] = {
    50: {"5": {"res3": (2, 1), "res4": (2, 1)}, "10": {"res3": (1, 0), "res4": (1, 0)}},
    101: {"5": {"res3": (2, 1), "res4": (7, 6)}, "10": {"res3": (1, 0), "res4": (4, 2)}},
}


@dataclass(frozen=True)
class Preset:
    """One named model of the paper.

    Attributes:
        depth: 50 or 101; picks `STAGE_BLOCKS` and `NONLOCAL_LAYOUTS`.
        inflation: key of `INFLATIONS`.
        nonlocal_blocks: default non-local layout ("5" or None).
        style: key of `STYLES`: whose variant of the network this is.
    """

    depth: int
    inflation: str
    nonlocal_blocks: str | None = None
    style: str = "official"


PRESETS = {
    "c2d_r50": Preset(50, "c2d"),
    "c2d_r101": Preset(101, "c2d"),
    "i3d_r50": Preset(50, "i3d"),
    "i3d_r101": Preset(101, "i3d"),
    "i3d3x3x3_r50": Preset(50, "i3d3x3x3"),
    "i3d3x3x3_r101": Preset(101, "i3d3x3x3"),
    "nl_c2d_r50": Preset(50, "c2d", "5"),
    "nl_c2d_r101": Preset(101, "c2d", "5"),
    "nl_i3d_r50": Preset(50, "i3d", "5"),
    "nl_i3d_r101": Preset(101, "i3d", "5"),
    # The networks behind mmaction2's I3D R50 32x2x1 checkpoints (nlnet.weights.convert_mmaction2).
    "i3d_r50_mmaction2": Preset(50, "i3d", style="mmaction2"),
    "nl_i3d_r50_mmaction2": Preset(50, "i3d", "5", style="mmaction2"),
}


def resolve_nonlocal_positions(
    spec: str | dict | None, depth: int, stage_blocks: tuple[int, ...]
) -> dict[str, tuple[int, ...]]:
    """Turn a non-local layout into {stage: block indices}; a block goes after each listed residual block.

    Args:
        spec: None or "0" (no blocks); "1" (one block right before the last block of res4); "5" or "10"
            (the paper's layouts, `NONLOCAL_LAYOUTS`, at the block indices they have in the depth's standard
            stages); "res2".."res5" (one block right before the last block of that stage, Table 2b); or an
            explicit {stage: [block indices]} with stage "res3" or 3. The counts may also be ints (0, 1, 5, 10).
        depth: 50 or 101, picks the "5"/"10" layout.
        stage_blocks: blocks per stage res2..res5.

    Returns:
        {stage name: sorted tuple of block indices}, only stages that get blocks, in stage order.

    Raises:
        ValueError: on an unknown name or stage, or on any requested block that the stages of ``stage_blocks``
            cannot hold: a layout always places every block it names, or none is built.
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = str(spec)  # `nonlocal_blocks: 5` in YAML or on the command line is the "5" layout
    if spec is None or spec == "0":
        return {}
    blocks_of = dict(zip(STAGES, stage_blocks, strict=True))
    if isinstance(spec, Mapping):  # a dict, or an OmegaConf DictConfig straight from a recipe
        return _explicit_positions(spec, blocks_of)
    if not isinstance(spec, str):
        raise ValueError(f"nonlocal_blocks must be a string, a dict or None, got {type(spec).__name__}")
    stage = "res4" if spec == "1" else spec
    if stage in blocks_of:
        # "Right before the last block" needs a last block and one before it.
        if blocks_of[stage] < 2:
            raise ValueError(
                f"nonlocal_blocks {spec!r} puts one block before the last block of {stage}, but {stage} has "
                f"{blocks_of[stage]} block(s) with stage_blocks={tuple(stage_blocks)}; give {stage} at least 2 "
                f"blocks or pass nonlocal_blocks={{{stage!r}: [0]}}"
            )
        return {stage: (blocks_of[stage] - 2,)}
    layouts = NONLOCAL_LAYOUTS[depth]
    if spec not in layouts:
        allowed = ["0", "1", *layouts, *STAGES]
        raise ValueError(f"nonlocal_blocks must be one of {allowed} or {{stage: [indices]}}, got {spec!r}")
    # The named layouts are the paper's block positions in the standard stages of this depth; shorter stages
    # cannot hold them, and a model named "5" must have five blocks.
    standard = dict(zip(STAGES, STAGE_BLOCKS[depth], strict=True))
    positions = {
        stage: tuple(index for index in range(standard[stage]) if index % step == offset)
        for stage, (step, offset) in layouts[spec].items()
    }
    for stage, indices in positions.items():
        if indices[-1] >= blocks_of[stage]:
            raise ValueError(
                f"nonlocal_blocks {spec!r} puts blocks after {stage} blocks {list(indices)}, but {stage} has "
                f"{blocks_of[stage]} block(s) with stage_blocks={tuple(stage_blocks)}; pass "
                f"nonlocal_blocks={{stage: [indices]}} with {stage} indices in 0..{blocks_of[stage] - 1}"
            )
    return positions


def _explicit_positions(spec: Mapping, blocks_of: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """{stage or stage number: block indices} -> {stage name: sorted indices}, every index inside its stage."""
    positions: dict[str, tuple[int, ...]] = {}
    for key, indices in spec.items():
        stage = f"res{key}" if isinstance(key, int) else key
        if stage not in blocks_of:
            raise ValueError(f"nonlocal_blocks: stage must be one of {STAGES} or 2..5, got {key!r}")
        if isinstance(indices, (int, str)):
            raise ValueError(
                f"nonlocal_blocks: {stage} takes a list of block indices, got {indices!r}; "
                f"pass nonlocal_blocks={{{stage!r}: [{indices!r}]}}"
            )
        chosen = tuple(sorted({int(index) for index in indices}))
        bad = [index for index in chosen if not 0 <= index < blocks_of[stage]]
        if bad:
            raise ValueError(
                f"nonlocal_blocks: {stage} has blocks 0..{blocks_of[stage] - 1} ({blocks_of[stage]} block(s)), "
                f"got indices {bad}; pass {stage} indices in 0..{blocks_of[stage] - 1} or lengthen the stage "
                "with stage_blocks"
            )
        if chosen:
            positions[stage] = chosen
    return {stage: positions[stage] for stage in STAGES if stage in positions}
