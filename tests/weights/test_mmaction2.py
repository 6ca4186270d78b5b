"""mmaction2 I3D checkpoints: the safe reader and name map (always), and by value against mmaction2 (with it)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from random_weights import randomise
from torch import nn

from nlnet.cli import main
from nlnet.weights import convert_mmaction2, load_converted, read_mmaction2
from nlnet.weights.mmaction2 import nlnet_name
from nlnet.weights.parity import (
    I3D_NON_LOCAL,
    MMAction2Recognizer,
    check_mmaction2,
    import_mmaction2,
)

# mmaction2's own names for a few tensors, with nlnet's, written out by hand from mmaction2's ResNet3d /
# mmcv's NonLocal3d / I3DHead module attributes.
HAND_MAP = {
    "backbone.conv1.conv.weight": "stem.conv.weight",
    "backbone.conv1.bn.running_var": "stem.bn.running_var",
    "backbone.layer1.0.conv1.conv.weight": "res2.0.conv1.weight",
    "backbone.layer1.0.downsample.conv.weight": "res2.0.downsample.0.weight",
    "backbone.layer1.0.downsample.bn.bias": "res2.0.downsample.1.bias",
    "backbone.layer3.5.conv3.bn.num_batches_tracked": "res4.5.bn3.num_batches_tracked",
    "backbone.layer2.1.non_local_block.theta.conv.weight": "res3.1.nonlocal_block.theta.weight",
    "backbone.layer2.1.non_local_block.phi.0.conv.bias": "res3.1.nonlocal_block.phi.bias",
    "backbone.layer3.3.non_local_block.g.0.conv.weight": "res4.3.nonlocal_block.g.weight",
    "backbone.layer3.3.non_local_block.conv_out.conv.weight": "res4.3.nonlocal_block.out.weight",
    "backbone.layer3.3.non_local_block.conv_out.bn.weight": "res4.3.nonlocal_block.norm.weight",
    "cls_head.fc_cls.weight": "head.fc.weight",
    "module.backbone.layer4.2.conv2.bn.weight": "res5.2.bn2.weight",
}


def test_name_map_on_hand_written_mmaction2_keys() -> None:
    for key, expected in HAND_MAP.items():
        assert nlnet_name(key) == expected, key
    assert nlnet_name("data_preprocessor.mean") is None
    assert nlnet_name("backbone.layer2.1.non_local_block.unknown.weight") is None


class _RunsCode:
    """Unpickling this would create ``marker``: the reader must refuse it, not run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _nlnet_keyed_as_mmaction2(model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an nlnet state dict into mmaction2's names by inverting `HAND_MAP`-style rules written here."""
    renamed = {}
    for key, tensor in model.state_dict().items():
        name = key.replace("stem.conv.", "backbone.conv1.conv.").replace("stem.bn.", "backbone.conv1.bn.")
        for stage in range(2, 6):
            name = name.replace(f"res{stage}.", f"backbone.layer{stage - 1}.")
        for index in "123":
            name = name.replace(f".conv{index}.weight", f".conv{index}.conv.weight").replace(
                f".bn{index}.", f".conv{index}.bn."
            )
        name = name.replace(".downsample.0.", ".downsample.conv.").replace(".downsample.1.", ".downsample.bn.")
        name = name.replace(".nonlocal_block.", ".non_local_block.").replace(".out.weight", ".conv_out.conv.weight")
        name = name.replace(".norm.", ".conv_out.bn.").replace(".theta.", ".theta.conv.")
        name = (
            name.replace(".phi.", ".phi.0.conv.").replace(".g.", ".g.0.conv.").replace("head.fc.", "cls_head.fc_cls.")
        )
        if name.endswith(".conv_out.bias") or name.endswith("out.bias"):
            continue  # mmaction2's conv_out has no bias
        renamed[name] = tensor.clone()
    return renamed


def test_reader_refuses_code_and_reports_what_it_left(tmp_path: Path) -> None:
    from nlnet.models import create

    source = create(
        "nl_i3d_r50_mmaction2",
        num_classes=7,
        stage_blocks=(1, 2, 2, 1),
        base_width=4,
        nonlocal_blocks={"res3": [1]},
        nonlocal_mode="dot_product",
    )
    marker = tmp_path / "was_run"
    checkpoint = {
        "state_dict": _nlnet_keyed_as_mmaction2(source),
        "meta": {"seed": np.int64(3), "hist": np.arange(3.0), "cfg": "x = 1", "trap": _RunsCode(marker)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
    }
    path = tmp_path / "mm.pth"
    torch.save(checkpoint, path)
    state, meta, unread = read_mmaction2(path)
    assert not marker.exists()
    assert set(state) == set(checkpoint["state_dict"])
    assert int(meta["seed"]) == 3 and meta["cfg"] == "x = 1"
    assert "entry 'optimizer'" in unread
    assert "__builtin__.getattr (refused, never called)" in unread
    out = tmp_path / "out.pt"
    report = convert_mmaction2(
        path, out, stage_blocks=(1, 2, 2, 1), base_width=4, nonlocal_blocks={"res3": [1]}, nonlocal_mode="dot_product"
    )
    assert report.unexpected == [] and report.missing == []
    model = load_converted(out)
    assert not model.training
    for key, tensor in source.state_dict().items():
        expected = torch.zeros_like(tensor) if key.endswith("nonlocal_block.out.bias") else tensor
        assert torch.equal(model.state_dict()[key], expected), key
    assert torch.load(out, weights_only=True)["normalization"]["std"] == [58.395, 57.12, 57.375]


def test_shape_mismatch_fails_before_writing(tmp_path: Path) -> None:
    from nlnet.models import create

    state = _nlnet_keyed_as_mmaction2(create("i3d_r50_mmaction2", stage_blocks=(1, 1, 1, 1), base_width=4))
    state["backbone.layer1.0.conv2.conv.weight"] = torch.zeros(4, 4, 3, 3, 3)
    path, out = tmp_path / "mm.pth", tmp_path / "out.pt"
    torch.save({"state_dict": state, "meta": {}}, path)
    with pytest.raises(ValueError, match=r"backbone\.layer1\.0\.conv2\.conv\.weight: shape \(4, 4, 3, 3, 3\)"):
        convert_mmaction2(path, out, stage_blocks=(1, 1, 1, 1), base_width=4)
    assert not out.exists()


def test_nonlocal_mode_must_be_known(tmp_path: Path) -> None:
    from nlnet.models import create

    state = _nlnet_keyed_as_mmaction2(
        create("nl_i3d_r50_mmaction2", stage_blocks=(1, 2, 2, 1), base_width=4, nonlocal_blocks={"res3": [1]})
    )
    path = tmp_path / "mm.pth"
    torch.save({"state_dict": state, "meta": {"cfg": "model = dict(x=1)"}}, path)
    with pytest.raises(ValueError, match="pass nonlocal_mode"):
        convert_mmaction2(
            path, tmp_path / "out.pt", stage_blocks=(1, 2, 2, 1), base_width=4, nonlocal_blocks={"res3": [1]}
        )


# ----------------------------------------------------------------------------- by value against mmaction2


def _mmaction2_importable() -> bool:
    try:
        import_mmaction2()
    except ImportError:
        return False
    return True


needs_mmaction2 = pytest.mark.skipif(
    not _mmaction2_importable(), reason="mmaction2 is not installed (extra 'mmaction')"
)


def _recognizer(mode: str | None) -> MMAction2Recognizer:
    """mmaction2's I3D R50 (NL I3D with ``mode``), 13 classes, in eval mode."""
    nonlocal_options = {} if mode is None else {"non_local": I3D_NON_LOCAL, "nonlocal_mode": mode}
    return MMAction2Recognizer(num_classes=13, **nonlocal_options).eval()


def _save_mmengine_checkpoint(model: nn.Module, path: Path, cfg: str) -> None:
    from mmengine.logging import HistoryBuffer

    history = HistoryBuffer()
    history.update(1.5)
    torch.save(
        {
            "meta": {
                "epoch": 100,
                "iter": 1234,
                "cfg": cfg,
                "seed": np.int64(0),
                "mmengine_version": "0.10.7",
                "dataset_meta": {"classes": np.array(["a", "b"])},
            },
            "state_dict": model.state_dict(),
            "message_hub": {"log_scalars": {"train/loss": history}, "runtime_info": {"epoch": 100}},
            "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.01}]},
        },
        path,
    )


@needs_mmaction2
@pytest.mark.parametrize("mode", [None, "embedded_gaussian", "dot_product", "gaussian"])
def test_logits_equal_mmaction2(tmp_path: Path, mode: str | None) -> None:
    torch.manual_seed(0)
    reference = _recognizer(mode)
    randomise(reference, ".non_local_block.", seed=1)
    path, out = tmp_path / "mm.pth", tmp_path / "out.pt"
    cfg = "" if mode is None else f"model = dict(backbone=dict(non_local_cfg=dict(sub_sample=True, mode='{mode}')))"
    _save_mmengine_checkpoint(reference, path, cfg)
    report = convert_mmaction2(path, out)
    assert report.missing == [] and report.unexpected == []
    assert any("mmengine.logging.history_buffer.HistoryBuffer" in note for note in report.notes)
    model = load_converted(out)
    clip = torch.randn(1, 3, 16, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(clip)
        logits = model(clip)
    scale = expected.abs().max()
    assert scale > 1e-2
    assert (logits - expected).abs().max() <= 1e-4 * scale
    if mode in ("embedded_gaussian", "dot_product"):  # the weights look alike: the mode read from cfg matters
        wrong = {"embedded_gaussian": "dot_product", "dot_product": "embedded_gaussian"}[mode]
        convert_mmaction2(path, tmp_path / "wrong.pt", nonlocal_mode=wrong)
        with torch.no_grad():
            other = load_converted(tmp_path / "wrong.pt")(clip)
        assert (other - expected).abs().max() > 1e-3 * scale


@needs_mmaction2
def test_cli_converts_an_mmaction2_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    reference = _recognizer("dot_product")
    randomise(reference, ".non_local_block.", seed=3)
    path, out = tmp_path / "mm.pth", tmp_path / "out.pt"
    _save_mmengine_checkpoint(reference, path, "")
    assert main(["convert", "mmaction2", str(path), str(out), "--nonlocal-mode", "dot_product"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_converted(out).res3[1].nonlocal_block.mode == "dot_product"


# ----------------------------------------------------------------------------- convert --check


def test_check_without_mmaction2_converts_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nlnet.models import create

    path, out = tmp_path / "mm.pth", tmp_path / "out.pt"
    torch.save({"state_dict": _nlnet_keyed_as_mmaction2(create("i3d_r50_mmaction2")), "meta": {}}, path)
    monkeypatch.setitem(sys.modules, "mmaction", None)  # mmaction2 unimportable, installed or not
    assert main(["convert", "mmaction2", str(path), str(out), "--check"]) == 0
    assert "no check was possible: mmaction2 is not installed" in capsys.readouterr().out
    assert load_converted(out).head.fc.out_features == 400


@needs_mmaction2
def test_check_passes_then_localises_a_corrupted_res4(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    reference = _recognizer("embedded_gaussian")
    randomise(reference, ".non_local_block.", seed=4)
    path, out = tmp_path / "mm.pth", tmp_path / "out.pt"
    cfg = "model = dict(backbone=dict(non_local_cfg=dict(sub_sample=True, mode='embedded_gaussian')))"
    _save_mmengine_checkpoint(reference, path, cfg)
    assert main(["convert", "mmaction2", str(path), str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "check passed" in printed and "res4" in printed
    report = check_mmaction2(path, out)
    assert [entry.stage for entry in report.stages] == ["stem", "res2", "res3", "res4", "res5", "logits"]
    assert all(entry.max_abs_diff < 1e-4 * entry.scale for entry in report.stages), report.summary()
    assert report.passed and report.first_over is None

    payload = torch.load(out, weights_only=True)
    payload["model"]["res4.5.conv3.weight"][:64].neg_()  # 64 of res4's last 1024 output filters flipped
    torch.save(payload, out)
    report = check_mmaction2(path, out)
    assert not report.passed and report.first_over == "res4", report.summary()
    assert [entry.max_abs_diff < 1e-4 * entry.scale for entry in report.stages[:3]] == [True] * 3
    # A wrong --nonlocal-mode against the mode the file's config records: the CLI exits 1, at res3's blocks.
    argv = ["convert", "mmaction2", str(path), str(out), "--check", "--nonlocal-mode", "dot_product"]
    assert main(argv) == 1
    assert "FAILED (first stage over tolerance: res3)" in capsys.readouterr().out
