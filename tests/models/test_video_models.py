"""The paper's C2D / I3D video models: sizes, layouts, shapes, heads, argument checks."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch._subclasses.fake_tensor import FakeTensorMode

from nlnet import NonLocalBlock
from nlnet.models import available, create, describe, nonlocal_blocks

# Parameter counts published outside nlnet (num_classes=400, every parameter, BN affine included), with the
# rounding step of the source: (millions, step).
PUBLISHED_PARAMS_M = {
    # PyTorchVideo model zoo (docs/source/model_zoo.md, Kinetics-400): C2D R50 24.33M, I3D R50 28.04M.
    "c2d_r50": (24.33, 0.01),
    "i3d_r50": (28.04, 0.01),
    # mmaction2 configs/recognition/i3d/README.md: I3D R50 with embedded-Gaussian / dot-product non-local, 35.4M.
    "nl_i3d_r50": (35.4, 0.1),
}
# Multiply-adds (G) on a 3x32x224x224 clip from an analytic count written independently of nlnet's FLOP counter.
ANALYTIC_GMACS = {
    "c2d_r50": 20.2,
    "nl_c2d_r50": 28.4,
    "i3d_r50": 32.8,
    "nl_i3d_r50": 41.0,
    "c2d_r101": 35.1,
    "nl_c2d_r101": 43.2,
    "i3d_r101": 51.4,
    "nl_i3d_r101": 59.5,
}


@functools.cache
def _describe(name: str):
    return describe(name)


def _build_meta(name: str, **overrides) -> torch.nn.Module:
    # Structure only: no memory, no initialisation cost, so R101 is as quick as R50.
    with torch.device("meta"):
        return create(name, **overrides)


def _positions(model: torch.nn.Module) -> list[str]:
    return [key.removesuffix(".nonlocal_block") for key in nonlocal_blocks(model)]


def test_available_lists_every_paper_model() -> None:
    assert available("video") == sorted(
        ["c2d_r50", "c2d_r101", "i3d_r50", "i3d_r101", "i3d3x3x3_r50", "i3d3x3x3_r101"]
        + ["nl_c2d_r50", "nl_c2d_r101", "nl_i3d_r50", "nl_i3d_r101"]
        + ["i3d_r50_mmaction2", "nl_i3d_r50_mmaction2"]
    )


def _conv_and_fc_weights(model: torch.nn.Module) -> int:
    return sum(
        module.weight.numel() for module in model.modules() if isinstance(module, (torch.nn.Conv3d, torch.nn.Linear))
    )


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_parameter_count_matches_the_published_model_zoos(name: str) -> None:
    stated, step = PUBLISHED_PARAMS_M[name]
    params = sum(parameter.numel() for parameter in _build_meta(name).parameters())
    # A count rounded to `step` is within half a step of the true one.
    assert abs(params / 1e6 - stated) <= step / 2, (name, params)


def test_parameter_counts_match_the_paper_table_2e() -> None:
    # Table 2e (R101, 400 classes): the C2D baseline has 43.2M parameters; I3D3x1x1 1.2x, NL C2D 5-block 1.2x
    # and I3D3x3x3 1.5x of it. Conv and fc weights round to 43.2M (with BN affine and biases: 43.32M, 43.3M).
    base = _conv_and_fc_weights(_build_meta("c2d_r101"))
    assert abs(base / 1e6 - 43.2) <= 0.05, base
    for name, ratio in (("i3d_r101", 1.2), ("nl_c2d_r101", 1.2), ("i3d3x3x3_r101", 1.5)):
        measured = _conv_and_fc_weights(_build_meta(name)) / base
        assert abs(measured - ratio) <= 0.05, (name, measured)


@pytest.mark.parametrize("name", sorted(ANALYTIC_GMACS))
def test_multiply_adds_match_an_independent_analytic_count(name: str) -> None:
    info = _describe(name)
    expected = ANALYTIC_GMACS[name] * 1e9
    assert abs(info.macs - expected) / expected < 5e-3, (name, info.macs)
    assert info.params == sum(p.numel() for p in _build_meta(name).parameters())


def test_multiply_add_ratios_match_the_paper_table_2e() -> None:
    base = _describe("c2d_r101").macs
    # Table 2e FLOPs relative to the R101 C2D baseline, rounded to 0.1: I3D3x1x1 1.5x, NL C2D 5-block 1.2x.
    for name, ratio in (("i3d_r101", 1.5), ("nl_c2d_r101", 1.2)):
        measured = _describe(name).macs / base
        assert abs(measured - ratio) <= 0.05, (name, measured)


R50_FIVE = ["res3.1", "res3.3", "res4.1", "res4.3", "res4.5"]
R101_FIVE = ["res3.1", "res3.3", "res4.6", "res4.13", "res4.20"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("c2d_r50", []),
        ("i3d_r101", []),
        ("i3d3x3x3_r50", []),
        ("nl_c2d_r50", R50_FIVE),
        ("nl_i3d_r50", R50_FIVE),
        ("nl_c2d_r101", R101_FIVE),
        ("nl_i3d_r101", R101_FIVE),
    ],
)
def test_preset_nonlocal_positions(name: str, expected: list[str]) -> None:
    model = _build_meta(name)
    assert _positions(model) == expected
    for key, block in nonlocal_blocks(model).items():
        stage = key.split(".")[0]
        assert block.in_channels == {"res3": 512, "res4": 1024}[stage]
        assert block.inner_channels == block.in_channels // 2
        assert block.pool_kernel == (1, 2, 2)
        assert block.pool_position == "before" and block.mode == "embedded_gaussian"
        assert block.scale_factor == pytest.approx(block.inner_channels**-0.5)


@pytest.mark.parametrize(
    ("name", "spec", "expected"),
    [
        ("c2d_r50", "1", ["res4.4"]),
        ("c2d_r101", "1", ["res4.21"]),
        ("c2d_r50", "10", ["res3.0", "res3.1", "res3.2", "res3.3"] + [f"res4.{i}" for i in range(6)]),
        ("c2d_r101", "10", ["res3.0", "res3.1", "res3.2", "res3.3"] + [f"res4.{i}" for i in range(2, 23, 4)]),
        ("c2d_r50", "res2", ["res2.1"]),
        ("c2d_r50", "res3", ["res3.2"]),
        ("c2d_r50", "res4", ["res4.4"]),
        ("c2d_r50", "res5", ["res5.1"]),
        ("nl_i3d_r50", "0", []),
        ("nl_i3d_r50", None, []),
        ("i3d_r50", "5", R50_FIVE),
        ("i3d_r50", 5, R50_FIVE),  # `nonlocal_blocks: 5` in YAML is an int
        ("nl_i3d_r50", 0, []),
        ("c2d_r101", {3: [2, 0], "res5": [2]}, ["res3.0", "res3.2", "res5.2"]),
    ],
)
def test_nonlocal_override_positions(name: str, spec, expected: list[str]) -> None:
    assert _positions(_build_meta(name, nonlocal_blocks=spec)) == expected


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        # The preset's "5" layout (res3 {1, 3}, res4 {1, 3, 5}) does not fit one block per stage.
        ("nl_c2d_r50", {"stage_blocks": (1, 1, 1, 1)}, r"res3 blocks \[1, 3\], but res3 has 1 block\(s\)"),
        ("nl_i3d_r50", {"stage_blocks": (3, 4, 4, 3)}, r"res4 blocks \[1, 3, 5\], but res4 has 4 block\(s\)"),
        ("nl_c2d_r101", {"stage_blocks": (3, 4, 6, 3)}, r"res4 blocks \[6, 13, 20\], but res4 has 6 block\(s\)"),
        ("c2d_r50", {"stage_blocks": (2, 2, 2, 2), "nonlocal_blocks": "10"}, r"res3 blocks \[0, 1, 2, 3\]"),
        ("c2d_r50", {"stage_blocks": (2, 4, 2, 2), "nonlocal_blocks": 5}, r"res4 blocks \[1, 3, 5\]"),
        # "1" and "resN" put a block before the stage's last block: a 1-block stage has no such place.
        ("c2d_r50", {"stage_blocks": (1, 1, 1, 1), "nonlocal_blocks": "1"}, "res4 has 1 block"),
        ("c2d_r50", {"stage_blocks": (1, 1, 1, 1), "nonlocal_blocks": "res2"}, "res2 has 1 block"),
        ("c2d_r50", {"stage_blocks": (1, 1, 1, 1), "nonlocal_blocks": {"res3": [0, 1]}}, r"got indices \[1\]"),
        ("c2d_r50", {"nonlocal_blocks": {5: [-1]}}, r"res5 has blocks 0..2 \(3 block\(s\)\), got indices \[-1\]"),
        ("c2d_r50", {"nonlocal_blocks": {"res4": 2}}, "res4 takes a list of block indices, got 2"),
    ],
)
def test_a_layout_that_does_not_fit_the_stages_is_rejected(name: str, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        _build_meta(name, **overrides)
    # The message says what to pass instead.
    assert "nonlocal_blocks={" in str(error.value) or "indices in 0.." in str(error.value)


def test_named_layouts_keep_the_paper_positions_in_longer_stages() -> None:
    # R50's "5" layout in a res4 of 23 blocks is still the paper's res3 {1, 3}, res4 {1, 3, 5}: five blocks.
    assert _positions(_build_meta("nl_c2d_r50", stage_blocks=(3, 4, 23, 3))) == R50_FIVE
    assert _positions(_build_meta("c2d_r50", stage_blocks=(2, 2, 2, 2), nonlocal_blocks="res3")) == ["res3.0"]


def test_a_layout_straight_from_a_recipe_is_accepted() -> None:
    # The engine can pass a recipe's mapping as an OmegaConf DictConfig rather than a dict.
    layout = OmegaConf.create({"res3": [1], "res4": [0, 2]})
    assert _positions(_build_meta("c2d_r50", nonlocal_blocks=layout)) == ["res3.1", "res4.0", "res4.2"]


def test_the_builtin_recipe_layout_builds_its_one_block() -> None:
    # nlnet/configs/builtin_nl_c2d.yaml: one block per stage, one non-local block after res3's only block.
    model = _build_meta("c2d_r50", stage_blocks=(1, 1, 1, 1), base_width=8, nonlocal_blocks={"res3": [0]})
    assert _positions(model) == ["res3.0"]


def test_nonlocal_options_reach_every_block() -> None:
    model = _build_meta(
        "nl_c2d_r50", nonlocal_mode="dot_product", nonlocal_extent="time", nonlocal_norm=None, nonlocal_pool=None
    )
    blocks = list(nonlocal_blocks(model).values())
    assert len(blocks) == 5
    for block in blocks:
        assert (block.mode, block.extent, block.norm, block.pool_kernel) == ("dot_product", "time", None, None)
    concat = nonlocal_blocks(_build_meta("nl_c2d_r50", nonlocal_mode="concatenation"))
    assert all(hasattr(block, "concat") for block in concat.values())
    # The official long-clip models: res3 blocks attend within groups of 4 frames, res4 blocks globally.
    grouped = nonlocal_blocks(_build_meta("nl_i3d_r50", nonlocal_norm=None, nonlocal_temporal_groups={3: 4}))
    assert {key: block.temporal_groups for key, block in grouped.items()} == {
        "res3.1.nonlocal_block": 4,
        "res3.3.nonlocal_block": 4,
        "res4.1.nonlocal_block": None,
        "res4.3.nonlocal_block": None,
        "res4.5.nonlocal_block": None,
    }


def _temporal_kernels(model: torch.nn.Module, conv: str) -> dict[str, list[int]]:
    return {
        stage: [getattr(block, conv).kernel_size[0] for block in getattr(model, stage)]
        for stage in ("res2", "res3", "res4", "res5")
    }


def test_i3d_inflation_pattern_is_the_official_one() -> None:
    r50 = _build_meta("i3d_r50")
    assert r50.stem.conv.kernel_size == (5, 7, 7)
    assert _temporal_kernels(r50, "conv1") == {
        "res2": [3, 3, 3],
        "res3": [3, 1, 3, 1],
        "res4": [3, 1, 3, 1, 3, 1],
        "res5": [1, 3, 1],
    }
    assert set(sum(_temporal_kernels(r50, "conv2").values(), [])) == {1}
    r101 = _build_meta("nl_i3d_r101")
    assert _temporal_kernels(r101, "conv1")["res4"] == [3 if i % 2 == 0 else 1 for i in range(23)]
    assert r101.res4[0].conv1.padding == (1, 0, 0)
    c2d = _build_meta("c2d_r50")
    assert c2d.stem.conv.kernel_size == (1, 7, 7)
    assert set(sum(_temporal_kernels(c2d, "conv1").values(), [])) == {1}
    i3d333 = _build_meta("i3d3x3x3_r50")
    assert _temporal_kernels(i3d333, "conv2") == _temporal_kernels(r50, "conv1")
    assert i3d333.res5[1].conv2.kernel_size == (3, 3, 3) and i3d333.res5[1].conv2.padding == (1, 1, 1)
    # The spatial stride sits on the 3x3 conv; all temporal strides inside blocks are 1.
    assert r50.res3[0].conv2.stride == (1, 2, 2) and r50.res3[0].conv1.stride == (1, 1, 1)


def _stage_shapes(name: str, clip_shape: tuple[int, ...], **overrides) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    with FakeTensorMode():
        model = create(name, **overrides).eval()
        for stage in ("stem", "res2", "res3", "res4", "res5"):
            getattr(model, stage).register_forward_hook(
                lambda module, args, out, stage=stage: shapes.__setitem__(stage, tuple(out.shape[1:]))
            )
        logits = model(torch.empty(1, *clip_shape))
        shapes["logits"] = tuple(logits.shape)
        shapes["dense"] = tuple(model.forward_dense(torch.empty(1, *clip_shape)).shape)
    return shapes


def test_full_size_shapes_follow_the_official_code() -> None:
    # 32x2: conv1 and pool1 halve time, pool1 has no padding (224 -> 55), pool2 halves time after res2.
    shapes = _stage_shapes("nl_i3d_r50", (3, 32, 224, 224))
    assert shapes["stem"] == (64, 8, 55, 55)
    assert shapes["res2"] == (256, 8, 55, 55)
    assert shapes["res3"] == (512, 4, 28, 28)
    assert shapes["res4"] == (1024, 4, 14, 14)
    assert shapes["res5"] == (2048, 4, 7, 7)
    assert shapes["logits"] == (1, 400)
    assert shapes["dense"] == (1, 400, 1, 1, 1)
    # 8x8: no temporal stride in the stem.
    shapes = _stage_shapes("nl_c2d_r101", (3, 8, 224, 224), clip="8x8")
    assert shapes["res2"] == (256, 8, 55, 55) and shapes["res5"] == (2048, 4, 7, 7)
    # Fully-convolutional testing on 256 x 256 crops: res5 8 x 8 -> a 2 x 2 map.
    shapes = _stage_shapes("nl_i3d_r50", (3, 32, 256, 256))
    assert shapes["res5"] == (2048, 4, 8, 8) and shapes["dense"] == (1, 400, 1, 2, 2)


@pytest.mark.parametrize(("clip", "frames", "res5_frames"), [("32x2", 16, 2), ("8x8", 8, 4)])
def test_real_forward_shapes_for_both_clip_formats(clip: str, frames: int, res5_frames: int) -> None:
    torch.manual_seed(0)
    model = create("nl_i3d_r50", clip=clip).eval()
    clip_tensor = torch.randn(2, 3, frames, 64, 64)
    with torch.no_grad():
        features = model.forward_features(clip_tensor)
        logits = model(clip_tensor)
    assert features.shape == (2, 2048, res5_frames, 2, 2)
    assert logits.shape == (2, 400) and torch.isfinite(logits).all()


def test_dense_mode_is_the_fc_applied_at_every_7x7_window() -> None:
    torch.manual_seed(0)
    model = create("c2d_r50", num_classes=10, clip="8x8", stage_blocks=(1, 1, 1, 1), base_width=8).eval()
    with torch.no_grad():
        for parameter in model.head.parameters():
            parameter.normal_()
        clip = torch.randn(1, 3, 4, 256, 256)
        features = model.forward_features(clip)
        dense = model.forward_dense(clip)
        logits = model(clip)
    assert features.shape[2:] == (2, 8, 8) and dense.shape == (1, 10, 1, 2, 2)
    fc = model.head.fc
    for i in range(2):
        for j in range(2):
            window = features[:, :, :, i : i + 7, j : j + 7].mean(dim=(2, 3, 4))
            torch.testing.assert_close(dense[:, :, 0, i, j], fc(window), rtol=1e-5, atol=1e-5)
    # The evaluator's rule: softmax at each location, then the mean (differs from softmax of the mean logits).
    scores = F.softmax(dense, dim=1).mean(dim=(2, 3, 4))
    assert torch.allclose(scores.sum(dim=1), torch.ones(1))
    torch.testing.assert_close(logits, dense.mean(dim=(2, 3, 4)), rtol=1e-5, atol=1e-5)


def test_initialisation_follows_the_official_code() -> None:
    torch.manual_seed(0)
    model = create("nl_i3d_r50")
    fc = model.head.fc
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.02) and not fc.bias.any()
    assert model.head.dropout.p == 0.5
    assert all(not block.bn3.weight.any() for block in model.res4)
    assert all(block.bn1.weight.eq(1).all() for block in model.res4)
    assert model.stem.conv.bias is None
    # Each non-local block starts as the identity (its BN γ = 0), and no BN but its own follows W_z.
    block = model.res3[1].nonlocal_block
    x = torch.randn(1, 512, 2, 4, 4)
    assert torch.equal(block(x), x)


@pytest.mark.parametrize("name", available("video"))
def test_every_preset_trains_as_a_tiny_model(name: str) -> None:
    torch.manual_seed(0)
    model = create(
        name, num_classes=5, stage_blocks=(1, 1, 2, 1), base_width=8, nonlocal_blocks={"res3": [0], "res4": [1]}
    )
    clip = torch.randn(2, 3, 8, 32, 32)
    logits = model(clip)
    assert logits.shape == (2, 5)
    F.cross_entropy(logits, torch.tensor([0, 3])).backward()
    assert model.head.fc.weight.grad.abs().sum() > 0
    assert model.stem.conv.weight.grad.abs().sum() > 0
    assert len(nonlocal_blocks(model)) == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"nonlocal_blocks": "7"}, "nonlocal_blocks must be one of"),
        ({"nonlocal_blocks": {"res6": [0]}}, "stage must be one of"),
        ({"nonlocal_blocks": {"res3": [4]}}, "res3 has blocks 0..3"),
        ({"nonlocal_mode": "softmax"}, "nonlocal_mode must be one of"),
        ({"nonlocal_extent": "all"}, "nonlocal_extent must be one of"),
        ({"clip": "16x4"}, "clip must be one of"),
        ({"stage_blocks": (3, 4, 6)}, "stage_blocks must be 4"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"nonlocal_pool": "default"}, "nonlocal_pool must be None or 3"),
        ({"nonlocal_pool": (1, 2)}, "nonlocal_pool must be None or 3"),
        ({"nonlocal_temporal_groups": {"res6": 4}}, "nonlocal_temporal_groups must map"),
        ({"depth": 50}, "unknown overrides"),
    ],
)
def test_bad_arguments_are_rejected_with_a_clear_message(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _build_meta("c2d_r50", **overrides)


def test_unknown_model_and_short_clip_are_rejected() -> None:
    with pytest.raises(ValueError, match="available: c2d_r101"):
        create("resnet50")
    model = create("c2d_r50", stage_blocks=(1, 1, 1, 1), base_width=8)
    with pytest.raises(ValueError, match="clip is too short"):
        model(torch.randn(1, 3, 4, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        model(torch.randn(1, 3, 32, 32))


def test_nonlocal_blocks_are_in_forward_order() -> None:
    model = create("nl_c2d_r50", stage_blocks=(2, 2, 2, 2), base_width=8, nonlocal_blocks={3: [0, 1], 4: [1, 0]})
    model.eval()
    seen: list[str] = []
    for key, block in nonlocal_blocks(model).items():
        assert isinstance(block, NonLocalBlock)
        block.register_forward_hook(lambda module, args, out, key=key: seen.append(key))
    model(torch.randn(1, 3, 8, 32, 32))
    assert seen == list(nonlocal_blocks(model)) == [
        "res3.0.nonlocal_block",
        "res3.1.nonlocal_block",
        "res4.0.nonlocal_block",
        "res4.1.nonlocal_block",
    ]


@pytest.mark.slow
def test_full_size_real_forward_of_nl_i3d_r50() -> None:
    torch.manual_seed(0)
    model = create("nl_i3d_r50").eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, 32, 224, 224))
        logits = model.head(features)
        dense = model.forward_dense(torch.randn(1, 3, 32, 256, 256))
    assert features.shape == (1, 2048, 4, 7, 7) and logits.shape == (1, 400)
    assert dense.shape == (1, 400, 1, 2, 2)
