"""PySlowFast checkpoints: names and shapes as documented in its source, the import, and its Caffe2 zoo names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nlnet.cli import main
from nlnet.models import create
from nlnet.weights import caffe2_name, convert_pyslowfast, load_converted, pyslowfast_name

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
