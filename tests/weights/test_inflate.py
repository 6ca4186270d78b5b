"""2D -> 3D inflation from a torchvision-format ResNet-50 state dict."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from nlnet.models import create
from nlnet.weights import create_pretrained, inflate_kernel, load_2d


@pytest.fixture(scope="module")
def resnet50_2d(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """A randomly initialised torchvision ResNet-50 with non-trivial BN statistics, and its saved state dict."""
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(net.state_dict(), path)
    return net.eval(), path


def _reference_stages(net: nn.Module, image: torch.Tensor) -> list[torch.Tensor]:
    """The 2D network's layer1..layer4 outputs, with the official stem pooling (3x3 stride 2, no padding)."""
    x = net.relu(net.bn1(net.conv1(image)))
    x = nn.functional.max_pool2d(x, kernel_size=3, stride=2, padding=0)
    outputs = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        x = layer(x)
        outputs.append(x)
    return outputs


def test_c2d_on_a_static_clip_gives_the_2d_features_at_every_time_step(resnet50_2d) -> None:
    net, path = resnet50_2d
    # float64 so that the comparison can be tight: conv3d over one frame and conv2d sum in different orders.
    model = create_pretrained("c2d_r50", path).eval().double()
    net = net.double()
    torch.manual_seed(1)
    image = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    clip = image[:, :, None].repeat(1, 1, 16, 1, 1)  # 16 identical frames
    stages = {}
    for stage in ("res2", "res3", "res4", "res5"):
        getattr(model, stage).register_forward_hook(
            lambda module, args, out, stage=stage: stages.__setitem__(stage, out)
        )
    with torch.no_grad():
        model(clip)
        reference = _reference_stages(net, image)
    for stage, expected in zip(("res2", "res3", "res4", "res5"), reference, strict=True):
        features = stages[stage]
        assert features.shape[2] >= 2  # several time steps to compare
        for step in range(features.shape[2]):
            torch.testing.assert_close(features[:, :, step], expected, rtol=1e-9, atol=1e-9)


def test_i3d_kernels_are_repeated_over_time_and_divided(resnet50_2d) -> None:
    net, path = resnet50_2d
    model = create_pretrained("nl_i3d_r50", path).double()
    net = net.double()
    stem = model.stem.conv.weight  # (64, 3, 5, 7, 7)
    for step in range(5):
        torch.testing.assert_close(stem[:, :, step], net.conv1.weight / 5)
    inflated = model.res5[1].conv1.weight
    assert inflated.shape[2] == 3
    for step in range(3):
        torch.testing.assert_close(inflated[:, :, step], net.layer4[1].conv1.weight / 3)
    torch.testing.assert_close(model.res4[2].bn2.running_var, net.layer3[2].bn2.running_var)


def test_report_names_what_was_not_loaded(resnet50_2d) -> None:
    _, path = resnet50_2d
    torch.manual_seed(0)
    model = create("nl_i3d_r50")
    fresh_nonlocal = {k: v.clone() for k, v in model.state_dict().items() if "nonlocal_block" in k}
    fresh_fc = model.head.fc.weight.clone()
    report = load_2d(model, path)
    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"]
    nonlocal_keys = sorted(k for k in model.state_dict() if "nonlocal_block" in k)
    assert sorted(report.missing) == sorted(nonlocal_keys + ["head.fc.bias", "head.fc.weight"])
    assert "stem.conv.weight" in report.inflated and "res2.0.conv1.weight" in report.inflated
    assert "res2.0.conv2.weight" not in report.inflated and "res2.0.conv2.weight" in report.loaded
    assert len(report.inflated) == 1 + 3 + 2 + 3 + 1
    for key, value in fresh_nonlocal.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert torch.equal(model.head.fc.weight, fresh_fc)
    assert f"missing (kept their initialisation): {5 * 13 + 2}" in report.summary()


def test_shape_mismatch_and_bad_files_are_refused(resnet50_2d, tmp_path: Path) -> None:
    _, path = resnet50_2d
    with pytest.raises(ValueError, match="shape mismatch for conv1.weight"):
        create_pretrained("c2d_r50", path, base_width=32)
    with pytest.raises(ValueError, match="shape mismatch"):
        inflate_kernel(torch.zeros(64, 3, 7, 7), (64, 3, 5, 5, 5), name="conv1.weight")
    bad = tmp_path / "not_a_state_dict.pt"
    torch.save({"epoch": 3}, bad)
    with pytest.raises(ValueError, match="torchvision-format state dict"):
        create_pretrained("c2d_r50", bad)


def test_models_create_reads_no_files_and_names_the_weights_function(resnet50_2d) -> None:
    _, path = resnet50_2d
    with pytest.raises(ValueError, match=r"nlnet\.weights\.create_pretrained"):
        create("c2d_r50", pretrained_2d=path)
