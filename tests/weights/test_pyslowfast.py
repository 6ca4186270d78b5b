"""PySlowFast checkpoints: names and shapes as documented in its source, its Caffe2 zoo names, the import, and
by value against PySlowFast's own ResNetModel (when the 'pyslowfast' extra is installed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from random_weights import randomise

from nlnet.cli import main
from nlnet.models import create
from nlnet.weights import caffe2_name, convert_pyslowfast, load_converted, pyslowfast_name
from nlnet.weights.parity import check_converted, check_pyslowfast, import_pyslowfast

# Names and shapes of PySlowFast's I3D-NLN R50 (configs/Kinetics/I3D_NLN_8x8_R50.yaml), written out from
# slowfast/models/{stem,resnet,nonlocal,head}_helper.py: conv1 5x7x7; the I3D temporal kernel basis
# [[3], [3, 1], [3, 1], [1, 3]] on branch2.a; dim_inner = dim / 2 in the non-local block.
DOCUMENTED_SHAPES = {
    "s1.pathway0_stem.conv.weight": (64, 3, 5, 7, 7),
    "s1.pathway0_stem.bn.running_var": (64,),
    "s2.pathway0_res0.branch1.weight": (256, 64, 1, 1, 1),
    "s2.pathway0_res0.branch1_bn.weight": (256,),
    "s2.pathway0_res0.branch2.a.weight": (64, 64, 3, 1, 1),
    "s3.pathway0_res1.branch2.a.weight": (128, 512, 1, 1, 1),
    "s4.pathway0_res0.branch2.b.weight": (256, 256, 1, 3, 3),
    "s5.pathway0_res1.branch2.a.weight": (512, 2048, 3, 1, 1),
    "s5.pathway0_res2.branch2.c_bn.bias": (2048,),
    "s3.pathway0_nonlocal1.conv_theta.weight": (256, 512, 1, 1, 1),
    "s3.pathway0_nonlocal3.conv_out.bias": (512,),
    "s4.pathway0_nonlocal5.bn.running_mean": (1024,),
    "head.projection.weight": (400, 2048),
}
# PySlowFast's slowfast/utils/c2_model_loading.py examples: Caffe2 blob -> PyTorch name.
C2_TO_PYSLOWFAST = {
    "conv1_w": "s1.pathway0_stem.conv.weight",
    "res_conv1_bn_riv": "s1.pathway0_stem.bn.running_var",
    "res4_0_branch1_w": "s4.pathway0_res0.branch1.weight",
    "res3_0_branch1_bn_s": "s3.pathway0_res0.branch1_bn.weight",
    "res4_4_branch2c_bn_b": "s4.pathway0_res4.branch2.c_bn.bias",
    "nonlocal_conv3_1_theta_w": "s3.pathway0_nonlocal1.conv_theta.weight",
    "nonlocal_conv4_5_bn_s": "s4.pathway0_nonlocal5.bn.weight",
    "pred_b": "head.projection.bias",
}


def _as_pyslowfast(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {pyslowfast_name(key): tensor.clone() for key, tensor in model.state_dict().items()}
    assert None not in state
    return state


def test_nlnet_names_and_shapes_match_pyslowfast_source() -> None:
    state = _as_pyslowfast(create("nl_i3d_r50", clip="8x8_pyslowfast"))
    for name, shape in DOCUMENTED_SHAPES.items():
        assert tuple(state[name].shape) == shape, name


def test_pyslowfast_caffe2_zoo_names_are_the_official_ones() -> None:
    # nlnet convert caffe2 takes PySlowFast's c2/I3D_NLN_8x8_R50.pkl if each of its blobs has an nlnet key,
    # and that key is the tensor PySlowFast itself loads the blob into.
    keys = create("nl_i3d_r50", clip="8x8_pyslowfast").state_dict()
    by_blob = {caffe2_name(key): key for key in keys}
    for blob, pyslowfast in C2_TO_PYSLOWFAST.items():
        assert pyslowfast_name(by_blob[blob]) == pyslowfast, blob


def test_convert_round_trip_and_reader(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = create("nl_i3d_r50", num_classes=11, clip="8x8_pyslowfast", nonlocal_mode="dot_product").eval()
    with torch.no_grad():
        for tensor in source.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_()
    path, out = tmp_path / "ck.pyth", tmp_path / "out.pt"
    cfg = "MODEL:\n  ARCH: i3d\nNONLOCAL:\n  LOCATION: [[[]], [[1, 3]], [[1, 3, 5]], [[]]]\n"
    cfg += "  INSTANTIATION: dot_product\n"
    torch.save(
        {"epoch": 196, "model_state": _as_pyslowfast(source), "optimizer_state": {"state": {}}, "cfg": cfg}, path
    )
    assert main(["convert", "pyslowfast", str(path), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "missing (kept their initialisation): 0" in printed and "entry 'optimizer_state'" in printed
    model = load_converted(out)
    assert model.res4[5].nonlocal_block.mode == "dot_product" and model.stem.pool.padding == (0, 1, 1)
    for key, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key


def test_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    state = _as_pyslowfast(create("i3d_r50", clip="8x8_pyslowfast"))
    state["s2.pathway0_res0.branch2.a.weight"] = torch.zeros(64, 64, 1, 1, 1)
    path, out = tmp_path / "ck.pyth", tmp_path / "out.pt"
    torch.save({"model_state": state}, path)
    with pytest.raises(ValueError, match=r"s2\.pathway0_res0\.branch2\.a\.weight: shape \(64, 64, 1, 1, 1\)"):
        convert_pyslowfast(path, out)
    assert not out.exists()


# ----------------------------------------------------------------------------- by value against PySlowFast


def _pyslowfast_importable() -> bool:
    try:
        import_pyslowfast()
    except ImportError:
        return False
    return True


needs_pyslowfast = pytest.mark.skipif(
    not _pyslowfast_importable(), reason="PySlowFast is not installed (extra 'pyslowfast')"
)
# configs/Kinetics/{C2D,I3D}_NLN_8x8_R50.yaml: NONLOCAL.LOCATION (res3 {1, 3}, res4 {1, 3, 5}).
NLN_LOCATION = [[[]], [[1, 3]], [[1, 3, 5]], [[]]]


def _pyslowfast_resnet(arch: str, instantiation: str | None, num_classes: int = 13):
    """PySlowFast's own ResNetModel as its Kinetics 8x8 R50 configs set it up, for 8 x 64 x 64 clips; returns
    (network in eval mode, its cfg as YAML text)."""
    get_cfg, resnet_model = import_pyslowfast()
    cfg = get_cfg()
    cfg.MODEL.ARCH, cfg.MODEL.NUM_CLASSES, cfg.RESNET.DEPTH = arch, num_classes, 50
    cfg.RESNET.ZERO_INIT_FINAL_BN = True
    cfg.RESNET.NUM_BLOCK_TEMP_KERNEL = [[3], [4], [6], [3]]
    cfg.DATA.INPUT_CHANNEL_NUM, cfg.DATA.NUM_FRAMES, cfg.DATA.CROP_SIZE = [3], 8, 64
    if instantiation is not None:
        cfg.NONLOCAL.LOCATION, cfg.NONLOCAL.INSTANTIATION = NLN_LOCATION, instantiation
    return resnet_model(cfg).eval(), cfg.dump()


def _save_pyth(network: torch.nn.Module, cfg: str, path: Path) -> None:
    """A checkpoint as PySlowFast's checkpoint.save_checkpoint writes it."""
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)
    torch.save(
        {"epoch": 196, "model_state": network.state_dict(), "optimizer_state": optimizer.state_dict(), "cfg": cfg},
        path,
    )


def _logits_and_probabilities(network: torch.nn.Module, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PySlowFast's eval output is softmax probabilities; its logits are the projection's output."""
    captured = []
    handle = network.head.projection.register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        probabilities = network([clip])
    handle.remove()
    return captured[0].reshape(probabilities.shape), probabilities


@needs_pyslowfast
@pytest.mark.parametrize(
    ("arch", "instantiation", "preset", "mode"),
    [
        ("c2d", None, "c2d_r50", None),
        ("i3d", None, "i3d_r50", None),
        ("c2d", "softmax", "nl_c2d_r50", "embedded_gaussian"),
        ("i3d", "softmax", "nl_i3d_r50", "embedded_gaussian"),
        ("i3d", "dot_product", "nl_i3d_r50", "dot_product"),
    ],
)
def test_logits_equal_pyslowfast(tmp_path: Path, arch, instantiation, preset, mode) -> None:
    torch.manual_seed(0)
    reference, cfg = _pyslowfast_resnet(arch, instantiation)
    randomise(reference, "nonlocal", seed=1)
    path, out = tmp_path / "ck.pyth", tmp_path / "out.pt"
    _save_pyth(reference, cfg, path)
    report = convert_pyslowfast(path, out)
    assert report.missing == [] and report.unexpected == []
    assert any("optimizer_state" in note for note in report.notes)
    model = load_converted(out)
    assert torch.load(out, weights_only=True)["arch"] == preset
    if mode is not None:
        assert model.res4[5].nonlocal_block.mode == mode
    clip = torch.randn(1, 3, 8, 64, 64, generator=torch.Generator().manual_seed(2))
    expected, probabilities = _logits_and_probabilities(reference, clip)
    with torch.no_grad():
        logits = model(clip)
    scale = expected.abs().max()
    assert scale > 1e-2
    assert (logits - expected).abs().max() <= 1e-4 * scale
    assert torch.allclose(logits.softmax(-1), probabilities, atol=1e-6)
    if mode is not None:  # the weights of both modes look alike: the mode read from the cfg matters
        wrong = {"embedded_gaussian": "dot_product", "dot_product": "embedded_gaussian"}[mode]
        convert_pyslowfast(path, tmp_path / "wrong.pt", nonlocal_mode=wrong)
        with torch.no_grad():
            other = load_converted(tmp_path / "wrong.pt")(clip)
        assert (other - expected).abs().max() > 1e-3 * scale


@needs_pyslowfast
def test_check_passes_then_localises_a_corrupted_res3(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    reference, cfg = _pyslowfast_resnet("i3d", "softmax")
    randomise(reference, "nonlocal", seed=4)
    path, out = tmp_path / "ck.pyth", tmp_path / "out.pt"
    _save_pyth(reference, cfg, path)
    assert main(["convert", "pyslowfast", str(path), str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "PySlowFast vs nlnet" in printed and "check passed" in printed
    report = check_pyslowfast(path, out)
    assert [entry.stage for entry in report.stages] == ["stem", "res2", "res3", "res4", "res5", "logits"]
    assert all(entry.max_abs_diff < 1e-4 * entry.scale for entry in report.stages), report.summary()

    payload = torch.load(out, weights_only=True)
    payload["model"]["res3.3.nonlocal_block.g.weight"].mul_(-1.5)  # the last res3 block's values changed
    torch.save(payload, out)
    report = check_pyslowfast(path, out)
    assert not report.passed and report.first_over == "res3", report.summary()
    # The other mode than the cfg records: the CLI exits 1, from res3's blocks on.
    argv = ["convert", "pyslowfast", str(path), str(out), "--check", "--nonlocal-mode", "dot_product"]
    assert main(argv) == 1
    assert "FAILED (first stage over tolerance: res3)" in capsys.readouterr().out


def test_check_without_pyslowfast_converts_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, out = tmp_path / "ck.pyth", tmp_path / "out.pt"
    torch.save({"model_state": _as_pyslowfast(create("c2d_r50", clip="8x8_pyslowfast"))}, path)
    monkeypatch.setitem(sys.modules, "slowfast", None)  # PySlowFast unimportable, installed or not
    assert main(["convert", "pyslowfast", str(path), str(out), "--check"]) == 0
    assert "no check was possible: PySlowFast is not installed" in capsys.readouterr().out
    assert load_converted(out).head.fc.out_features == 400


def test_no_reference_for_caffe2(tmp_path: Path) -> None:
    report = check_converted("caffe2", tmp_path / "in", tmp_path / "out.pt", tolerance=1e-4)
    assert not report.checked and not report.passed
    assert "no reference implementation" in report.summary() and "stores no reference outputs" in report.summary()
