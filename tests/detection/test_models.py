"""The §6 detectors: where the non-local blocks sit, key compatibility with torchvision, identity at init."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import keypointrcnn_resnet50_fpn, maskrcnn_resnet50_fpn
from torchvision.ops.misc import FrozenBatchNorm2d

from nlnet import NonLocalBlock
from nlnet.data.context_coco import SIDE_BAR, SIDE_GAP
from nlnet.models import detection

SMALL = {"min_size": 96, "max_size": 128}


@functools.cache
def _default(name: str) -> nn.Module:
    """One detector per name with torchvision's default classes, shared by the structural tests."""
    return detection.create(name, **SMALL).eval()


def _call_order(sequence: nn.Sequential, x: torch.Tensor) -> list[str]:
    """Names of ``sequence``'s children in the order they run on ``x``."""
    order: list[str] = []
    handles = [
        child.register_forward_hook(lambda *_, name=name: order.append(name))
        for name, child in sequence.named_children()
    ]
    with torch.no_grad():
        sequence(x)
    for handle in handles:
        handle.remove()
    return order


@pytest.mark.parametrize(
    ("name", "res4_blocks", "after"),
    [("maskrcnn_r50_fpn", 6, 4), ("maskrcnn_r101_fpn", 23, 21), ("keypointrcnn_r50_fpn", 6, 4)],
)
def test_backbone_block_runs_right_before_the_last_res4_block(
    name: str, res4_blocks: int, after: int
) -> None:
    model = _default(name)
    res4 = model.backbone.body.layer3
    order = _call_order(res4, torch.randn(1, 512, 8, 8))
    expected = [str(i) for i in range(res4_blocks)]
    expected.insert(after + 1, f"nonlocal_after_{after}")
    assert order == expected
    assert order[-1] == str(res4_blocks - 1)  # the last residual block of res4 follows the non-local block
    block = dict(res4.named_children())[f"nonlocal_after_{after}"]
    assert isinstance(block, NonLocalBlock)
    assert block.theta.in_channels == 1024 and block.theta.out_channels == 512
    assert block.pool_kernel == (2, 2)
    assert isinstance(block.norm, nn.BatchNorm2d)
    assert torch.count_nonzero(block.norm.weight) == 0
    backbone_blocks = [n for n in detection.nonlocal_blocks(model) if n.startswith("backbone.")]
    assert backbone_blocks == [f"backbone.body.layer3.nonlocal_after_{after}"]


def test_keypoint_head_has_a_block_after_every_second_conv() -> None:
    model = _default("keypointrcnn_r50_fpn")
    head = model.roi_heads.keypoint_head
    kinds = []
    for _, child in head.named_children():
        kinds.append({nn.Conv2d: "conv", nn.ReLU: "relu", NonLocalBlock: "NL"}[type(child)])
    assert kinds == ["conv", "relu", "conv", "relu", "NL"] * 4
    assert _call_order(head, torch.randn(2, 256, 14, 14)) == [name for name, _ in head.named_children()]
    head_blocks = [m for n, m in detection.nonlocal_blocks(model).items() if ".keypoint_head." in n]
    assert len(head_blocks) == 4
    assert all(b.theta.in_channels == 512 and b.theta.out_channels == 256 for b in head_blocks)
    without = detection.create("keypointrcnn_r50_fpn", nonlocal_head=False, nonlocal_backbone=False, **SMALL)
    assert detection.nonlocal_blocks(without) == {}


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        (
            "maskrcnn_r50_fpn",
            lambda: maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91),
        ),
        (
            "keypointrcnn_r50_fpn",
            lambda: keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2),
        ),
    ],
)
def test_state_dict_is_torchvision_plus_nonlocal_keys(name, reference) -> None:
    ours = _default(name).state_dict()
    theirs = reference().state_dict()
    extra = set(ours) - set(theirs)
    assert set(theirs) <= set(ours)
    assert extra and all(".nonlocal_after_" in key for key in extra)
    assert all(ours[k].shape == theirs[k].shape for k in theirs)


def _randomise(model: nn.Module, seed: int) -> None:
    """Non-trivial weights and BN statistics, standing in for a trained detector."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)


def _detections_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("kind", ["mask", pytest.param("keypoint", marks=pytest.mark.slow)])
def test_trained_torchvision_detector_gives_the_same_detections_with_the_blocks(tmp_path, kind: str) -> None:
    torch.manual_seed(0)
    common = {"weights": None, "weights_backbone": None, "box_score_thresh": 0.0, **SMALL}
    if kind == "mask":
        vanilla = maskrcnn_resnet50_fpn(num_classes=4, **common)
        name, extra = "maskrcnn_r50_fpn", {}
    else:
        vanilla = keypointrcnn_resnet50_fpn(num_classes=2, num_keypoints=4, **common)
        name, extra = "keypointrcnn_r50_fpn", {"num_keypoints": 4}
    _randomise(vanilla, seed=1)
    path = tmp_path / "torchvision_detector.pth"
    torch.save(vanilla.eval().state_dict(), path)

    model = detection.create(
        name, num_classes=4 if kind == "mask" else 2, box_score_thresh=0.0, **extra, **SMALL
    ).eval()
    report = detection.load_detector_state_dict(model, torch.load(path, weights_only=True))
    blocks = detection.nonlocal_blocks(model)
    assert len(blocks) == (1 if kind == "mask" else 5)
    # BN fills in a missing num_batches_tracked counter itself; every other tensor of every block is reported
    expected = [
        f"{n}.{k}" for n, b in blocks.items() for k in b.state_dict() if k != "norm.num_batches_tracked"
    ]
    assert sorted(report.missing_nonlocal) == sorted(expected)
    calls = []
    for block in blocks.values():
        block.register_forward_hook(lambda *_: calls.append(1))

    images = [torch.rand(3, 100, 120, generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    with torch.no_grad():
        expected = vanilla(images)
        got = model(images)
    assert sum(len(d["boxes"]) for d in expected) > 0
    assert len(calls) >= len(blocks)  # every block ran
    _detections_equal(expected, got)


def test_imagenet_backbone_loads_into_the_nonlocal_variant() -> None:
    torch.manual_seed(0)
    imagenet = resnet50()
    model = detection.create("maskrcnn_r50_fpn", num_classes=3, backbone_norm="frozen_bn", **SMALL)
    report = detection.load_backbone_state_dict(model, imagenet.state_dict())
    assert report.missing_nonlocal and all(".nonlocal_after_4." in k for k in report.missing_nonlocal)
    body = model.backbone.body
    # positions shift by one after the block; names do not
    assert torch.equal(getattr(body.layer3, "5").conv2.weight, imagenet.layer3[5].conv2.weight)
    assert torch.equal(body.bn1.running_var, imagenet.bn1.running_var)
    with pytest.raises(ValueError, match="not a torchvision ResNet"):
        detection.load_backbone_state_dict(model, {"conv1.weight": torch.zeros(1)})


def test_frozen_backbone_bn_keeps_a_trainable_block_bn() -> None:
    model = detection.create(
        "maskrcnn_r50_fpn", num_classes=3, backbone_norm="frozen_bn", trainable_backbone_layers=1
    )
    body = model.backbone.body
    assert isinstance(body.layer3[0].bn1, FrozenBatchNorm2d)
    assert not body.layer3[0].conv1.weight.requires_grad and body.layer4[0].conv1.weight.requires_grad
    block = detection.nonlocal_blocks(model)["backbone.body.layer3.nonlocal_after_4"]
    assert isinstance(block.norm, nn.BatchNorm2d)
    assert all(p.requires_grad for p in block.parameters())


def test_group_norm_backbone_keeps_each_image_independent_of_its_batch_partner() -> None:
    """Why the context recipe trains with GN: with batch statistics, a whole-image feature is relative.

    In training mode, the features of image A next to image B differ from those of A next to C under BN, and
    are the same under GN (and then equal A's in evaluation mode: nothing is gathered over the batch).
    """
    torch.manual_seed(0)
    a, b, c = (torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3))
    for norm, independent in (("bn", False), ("gn", True)):
        body = detection.create(
            "maskrcnn_r50_fpn", num_classes=3, backbone_norm=norm, nonlocal_norm=None, **SMALL
        ).backbone.body
        if norm == "gn":
            assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in body.modules())
            assert {m.num_groups for m in body.modules() if isinstance(m, nn.GroupNorm)} == {32}
        with torch.no_grad():
            next_to_b = body.train()(torch.cat([a, b]))["2"][:1]
            next_to_c = body(torch.cat([a, c]))["2"][:1]
            alone = body.eval()(a)["2"]
        assert torch.allclose(next_to_b, next_to_c, atol=1e-4) is independent, norm
        if independent:
            torch.testing.assert_close(next_to_b, alone, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize(("norm", "baseline_reaches"), [("frozen_bn", False), ("ln", False), ("gn", True)])
def test_the_side_cue_is_beyond_the_convolutions_reach_and_within_the_blocks(norm: str, baseline_reaches: bool) -> None:
    """On side-layout images (112 x 500, bar in columns 0-47, objects from column 388), the features the box
    and mask heads pool over the objects' strip do not depend on the bar's pixels without the block, and do
    with it: in evaluation mode with frozen BN (the paper's fine-tuning), and in training mode with the
    per-position LayerNorm. GroupNorm's statistics span the image, so through them they do even without it.
    """
    torch.manual_seed(0)
    width = 112 + SIDE_BAR + SIDE_GAP
    for with_block in (False, True):
        model = detection.create(
            "maskrcnn_r50_fpn",
            num_classes=4,
            backbone_norm=norm,
            nonlocal_backbone=with_block,
            nonlocal_norm=None,
        ).train(norm != "frozen_bn")
        if with_block:  # W_z starts at zero; any trained value opens the path
            nn.init.normal_(detection.nonlocal_blocks(model)["backbone.body.layer3.nonlocal_after_4"].out.weight)
        images = torch.rand(2, 3, 112, width, requires_grad=True)
        features = model.backbone(images)
        total = 0
        for level in model.roi_heads.box_roi_pool.featmap_names:
            stride = width / features[level].shape[-1]
            first = int((SIDE_BAR + SIDE_GAP - 2 * stride) // stride)  # two cells of slack for RoIAlign's interpolation
            total = total + features[level][..., first:].sum()
        (grad,) = torch.autograd.grad(total, images)
        reached = grad[..., :SIDE_BAR].abs().sum().item()
        assert (reached > 0) is (with_block or baseline_reaches), (with_block, reached)


def test_block_without_norm_starts_as_the_identity_with_a_zero_w_z() -> None:
    torch.manual_seed(0)
    model = detection.create("maskrcnn_r50_fpn", num_classes=3, nonlocal_norm=None, **SMALL)
    block = detection.nonlocal_blocks(model)["backbone.body.layer3.nonlocal_after_4"]
    assert block.norm is None and torch.count_nonzero(block.out.weight) == 0
    x = torch.randn(2, 1024, 6, 7)
    torch.testing.assert_close(block.train()(x), x, rtol=0, atol=0)
    assert not any("nonlocal" in k and ".norm." in k for k in model.state_dict())


def test_block_can_start_like_the_backbone_convolutions_instead_of_the_identity() -> None:
    torch.manual_seed(0)
    model = detection.create(
        "keypointrcnn_r50_fpn", nonlocal_norm=None, nonlocal_zero_init=False, backbone_norm="ln", **SMALL
    )
    blocks = detection.nonlocal_blocks(model)
    assert len(blocks) == 5
    for block in blocks.values():
        fan_out = block.out.weight.shape[0]  # 1x1 kernels
        # Kaiming normal, fan-out, for ReLU: std sqrt(2 / fan_out)
        assert block.out.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)
    with pytest.raises(ValueError, match="nonlocal_zero_init=False needs nonlocal_norm=None"):
        detection.create("maskrcnn_r50_fpn", nonlocal_zero_init=False, **SMALL)


def test_scale_mult_sharpens_every_blocks_softmax() -> None:
    torch.manual_seed(0)
    model = detection.create("keypointrcnn_r50_fpn", nonlocal_scale_mult=4.0, **SMALL)
    blocks = detection.nonlocal_blocks(model)
    assert len(blocks) == 5
    for block in blocks.values():
        channels = block.in_channels
        x = torch.randn(1, channels, 6, 5)
        theta = block.theta(x).flatten(2).transpose(1, 2)  # (1, 30, C/2)
        phi = block.phi(torch.nn.functional.max_pool2d(x, 2)).flatten(2)  # keys pooled 2x2 before φ: (1, C/2, 6)
        expected = torch.softmax(4.0 * (channels // 2) ** -0.5 * torch.bmm(theta, phi), dim=-1)
        torch.testing.assert_close(block.attention(x), expected)
    with pytest.raises(ValueError, match="scales a softmax, which nonlocal_mode='dot_product' has not"):
        detection.create("maskrcnn_r50_fpn", nonlocal_mode="dot_product", nonlocal_scale_mult=2.0, **SMALL)
    with pytest.raises(ValueError, match="nonlocal_scale_mult must be a positive number, got 0"):
        detection.create("maskrcnn_r50_fpn", nonlocal_scale_mult=0, **SMALL)


@pytest.mark.parametrize(
    "name, head", [("maskrcnn_r50_fpn", "mask_roi_pool"), ("keypointrcnn_r50_fpn", "keypoint_roi_pool")]
)
def test_roi_canonical_scale_moves_small_objects_to_coarser_levels(name: str, head: str) -> None:
    from torchvision.ops import roi_align

    torch.manual_seed(0)
    # FPN's features for a 112 x 112 image: P2..P5 at strides 4, 8, 16, 32.
    features = {str(i): torch.randn(1, 4, 112 // 2 ** (i + 2), 112 // 2 ** (i + 2)) for i in range(4)}
    boxes = torch.tensor([[10.0, 20.0, 26.0, 36.0], [20.0, 10.0, 84.0, 74.0]])  # 16 and 64 px a side
    # Lin et al.'s k = floor(4 + log2(sqrt(wh) / s0)), clipped to P2..P5: at s0 = 224 both boxes are on P2;
    # at s0 = 32 the 16-px box is on P3 (k = 3) and the 64-px box on P5 (k = 5).
    for canonical, levels in ((224, (0, 0)), (32, (1, 3))):
        model = detection.create(name, roi_canonical_scale=canonical, **SMALL)
        for pool, size in ((model.roi_heads.box_roi_pool, 7), (getattr(model.roi_heads, head), 14)):
            pooled = pool(features, [boxes], [(112, 112)])
            for box, level, out in zip(boxes, levels, pooled, strict=True):
                expected = roi_align(
                    features[str(level)], [box[None]], size, spatial_scale=1 / 2 ** (level + 2), sampling_ratio=2
                )
                torch.testing.assert_close(out[None], expected)
    with pytest.raises(ValueError, match="roi_canonical_scale must be a positive integer, got 0"):
        detection.create(name, roi_canonical_scale=0, **SMALL)
    with pytest.raises(ValueError, match=r"roi_canonical_scale=32 builds \['box_roi_pool'"):
        detection.create(name, roi_canonical_scale=32, box_roi_pool=model.roi_heads.box_roi_pool, **SMALL)


def test_mismatched_predictor_is_reported_or_skipped() -> None:
    source = detection.create(
        "maskrcnn_r50_fpn", num_classes=91, nonlocal_backbone=False, **SMALL
    ).state_dict()
    model = detection.create("maskrcnn_r50_fpn", num_classes=4, **SMALL)
    with pytest.raises(ValueError, match="shape mismatch"):
        detection.load_detector_state_dict(model, source)
    report = detection.load_detector_state_dict(model, source, skip_mismatched=True)
    assert "roi_heads.box_predictor.cls_score.weight" in report.skipped_mismatched
    with pytest.raises(ValueError, match="unexpected keys"):
        detection.load_detector_state_dict(
            model, {**source, "bogus.weight": torch.zeros(1)}, skip_mismatched=True
        )


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="unknown detector"):
        detection.create("maskrcnn_r18_fpn")
    with pytest.raises(ValueError, match="keypoint head"):
        detection.create("maskrcnn_r50_fpn", nonlocal_head=True)
    with pytest.raises(ValueError, match="trainable_backbone_layers"):
        detection.create("maskrcnn_r50_fpn", trainable_backbone_layers=6)
    with pytest.raises(ValueError, match=r"backbone_norm must be one of \[.*'ln'\], got 'syncbn'"):
        detection.create("maskrcnn_r50_fpn", backbone_norm="syncbn")
    assert detection.available() == ["keypointrcnn_r50_fpn", "maskrcnn_r101_fpn", "maskrcnn_r50_fpn"]


def test_public_namespace() -> None:
    from nlnet import detection as namespace

    assert namespace.create is detection.create and namespace.available() == detection.available()
