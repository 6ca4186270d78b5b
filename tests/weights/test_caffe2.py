"""Official Caffe2 model-zoo files: the safe reader, the name map, import, export and the round trip."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nlnet.cli import main
from nlnet.models import create
from nlnet.weights import (
    UnsafePickleError,
    caffe2_name,
    convert_caffe2,
    export_caffe2,
    load_converted,
    read_blobs,
)


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BN statistic a distinct random value so any mix-up changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith(("running_var", "bn1.weight", "bn2.weight", "bn3.weight", "norm.weight")):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.dim() >= 2:
                tensor.mul_(0.9).add_(0.02 * torch.randn(tensor.shape, generator=generator))
            else:
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
    return model.eval()


def _tiny_r101(**overrides) -> nn.Module:
    # The real R101 block structure (res4 has 23 blocks, non-local after 6, 13 and 20) at 1/8 of the width.
    return create("nl_i3d_r101", num_classes=11, base_width=8, **overrides)


def test_names_follow_the_official_scheme() -> None:
    with torch.device("meta"):
        model = create("nl_i3d_r50")
    shapes = {caffe2_name(k): tuple(v.shape) for k, v in model.state_dict().items() if caffe2_name(k)}
    assert shapes["conv1_w"] == (64, 3, 5, 7, 7)
    assert shapes["res_conv1_bn_riv"] == (64,)
    assert shapes["res2_0_branch1_w"] == (256, 64, 1, 1, 1)
    assert shapes["res2_0_branch2a_w"] == (64, 64, 3, 1, 1)
    assert shapes["res3_0_branch2b_w"] == (128, 128, 1, 3, 3)
    assert shapes["res5_2_branch2c_bn_s"] == (2048,)
    assert shapes["nonlocal_conv3_1_theta_w"] == (256, 512, 1, 1, 1)
    assert shapes["nonlocal_conv3_1_out_w"] == (512, 256, 1, 1, 1)
    assert shapes["nonlocal_conv4_5_phi_b"] == (512,)
    assert shapes["nonlocal_conv3_1_bn_s"] == (512,)
    assert shapes["pred_w"] == (400, 2048) and shapes["pred_b"] == (400,)
    keys = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    assert len(shapes) == len(keys)  # every tensor has exactly one distinct blob
    assert caffe2_name("res4.13.bn2.running_var") == "res4_13_branch2b_bn_riv"
    assert caffe2_name("res4.20.nonlocal_block.g.weight") == "nonlocal_conv4_20_g_w"
    assert caffe2_name("res4.13.bn2.num_batches_tracked") is None


def test_round_trip_export_convert_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _randomise(_tiny_r101())
    pkl, converted = tmp_path / "model.pkl", tmp_path / "model.pt"
    export_caffe2(model, pkl)
    with open(pkl, "rb") as handle:
        raw = pickle.load(handle)["blobs"]  # an ordinary pickle of numpy arrays, as the official files
    assert raw["res4_13_branch2a_w"].shape == (32, 128, 1, 1, 1)
    assert raw["res4_14_branch2a_w"].shape == (32, 128, 3, 1, 1)
    assert raw["nonlocal_conv4_20_theta_w"].shape == (64, 128, 1, 1, 1)
    report = convert_caffe2(pkl, converted, "nl_i3d_r101", base_width=8)
    assert report.missing == [] and report.unexpected == [] and report.notes == []
    restored = load_converted(converted)
    payload = torch.load(converted, weights_only=True)
    assert payload["arch"] == "nl_i3d_r101" and payload["num_classes"] == 11
    clip = torch.randn(2, 3, 16, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(clip), restored(clip))
    for key, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key


def test_cli_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = _randomise(create("c2d_r50", num_classes=7))
    state_file = tmp_path / "trained.pt"
    torch.save({"model": model.state_dict(), "iteration": 3}, state_file)  # an engine-style checkpoint
    pkl, back = tmp_path / "out.pkl", tmp_path / "back.pt"
    assert main(["convert", "--to", "caffe2", str(state_file), str(pkl)]) == 0
    assert main(["convert", "caffe2", str(pkl), str(back)]) == 2  # the import needs --model
    assert main(["convert", "caffe2", str(pkl), str(back), "--model", "c2d_r50"]) == 0
    printed = capsys.readouterr().out
    batch_norms = sum(isinstance(module, nn.BatchNorm3d) for module in model.modules())
    assert f"wrote {len(model.state_dict()) - batch_norms} blobs to {pkl}" in printed
    assert "missing (kept their initialisation): 0" in printed
    restored = load_converted(back)
    clip = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(clip), restored(clip))


def test_skipped_missing_unexpected_and_flat_files(tmp_path: Path) -> None:
    model = _randomise(create("nl_c2d_r50", num_classes=5, base_width=8))
    pkl = tmp_path / "model.pkl"
    export_caffe2(model, pkl)
    with open(pkl, "rb") as handle:
        blobs = pickle.load(handle)["blobs"]
    blobs.pop("nonlocal_conv4_3_g_w")
    blobs.update(
        {
            "lr": np.float32(0.01),
            "model_iter": np.int64(400000),
            "res2_0_branch2a_w_momentum": np.zeros(3, np.float32),
            "extra_conv_w": np.zeros((2, 2), np.float32),
        }
    )
    with open(pkl, "wb") as handle:
        pickle.dump(blobs, handle, protocol=2)  # the flat form, without the 'blobs' wrapper
    assert "lr" not in read_blobs(pkl) and "res2_0_branch2a_w_momentum" not in read_blobs(pkl)
    report = convert_caffe2(pkl, tmp_path / "model.pt", "nl_c2d_r50", base_width=8)
    assert report.missing == ["nonlocal_conv4_3_g_w"]
    assert report.unexpected == ["extra_conv_w"]
    assert "nonlocal_conv4_3_g_w" in report.summary() and "extra_conv_w" in report.summary()


def test_shape_mismatch_fails(tmp_path: Path) -> None:
    pkl = tmp_path / "i3d.pkl"
    export_caffe2(create("i3d_r50", base_width=8), pkl)
    with pytest.raises(ValueError, match=r"shape mismatch for conv1_w: source \(8, 3, 5, 7, 7\)"):
        convert_caffe2(pkl, tmp_path / "c2d.pt", "c2d_r50", base_width=8)
    assert not (tmp_path / "c2d.pt").exists()


def test_frozen_bn_affine_file_loads_exactly(tmp_path: Path) -> None:
    # The long-clip models: BN folded to scale/shift (_s, _b only), non-local blocks without BN.
    reference = _randomise(create("nl_i3d_r50", num_classes=6, base_width=8, nonlocal_norm=None), seed=3)
    blobs = {}
    for key, value in reference.state_dict().items():
        name = caffe2_name(key)
        if name is not None:
            blobs[name] = value.numpy().astype(np.float64)
    for name in [n for n in blobs if n.endswith("_bn_s")]:
        prefix = name[: -len("_s")]
        scale = blobs[name] / np.sqrt(blobs[f"{prefix}_riv"] + 1e-5)
        blobs[f"{prefix}_b"] = blobs[f"{prefix}_b"] - blobs.pop(f"{prefix}_rm") * scale
        blobs[name] = scale
        del blobs[f"{prefix}_riv"]
    pkl = tmp_path / "affine.pkl"
    with open(pkl, "wb") as handle:
        pickle.dump({"blobs": {k: v.astype(np.float32) for k, v in blobs.items()}}, handle, protocol=2)
    report = convert_caffe2(pkl, tmp_path / "affine.pt", "nl_i3d_r50", base_width=8)
    assert report.missing == [] and report.unexpected == []
    assert any("nonlocal_norm=None" in note for note in report.notes)
    assert any("running_mean 0 and running_var 1 - eps" in note for note in report.notes)
    restored = load_converted(tmp_path / "affine.pt")
    assert torch.equal(restored.res3[0].bn1.running_mean, torch.zeros(16))
    assert torch.equal(restored.res3[0].bn1.running_var, torch.full((16,), 1 - 1e-5))
    clip = torch.randn(1, 3, 16, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(restored(clip), reference(clip), rtol=1e-4, atol=1e-5)


def test_2d_caffe2_kernels_are_inflated(tmp_path: Path) -> None:
    source = _randomise(create("c2d_r50", base_width=8))
    blobs = {}
    for key, value in source.state_dict().items():
        name = caffe2_name(key)
        if name is not None:
            # ImageNet init files store 2D kernels (O, I, kH, kW).
            blobs[name] = value.numpy()[:, :, 0] if value.dim() == 5 else value.numpy()
    pkl = tmp_path / "imagenet.pkl"
    with open(pkl, "wb") as handle:
        pickle.dump({"blobs": blobs}, handle, protocol=2)
    report = convert_caffe2(pkl, tmp_path / "i3d.pt", "i3d_r50", base_width=8)
    assert "stem.conv.weight" in report.inflated and len(report.inflated) == 1 + 3 + 2 + 3 + 1
    weight = load_converted(tmp_path / "i3d.pt").stem.conv.weight
    for step in range(5):
        torch.testing.assert_close(weight[:, :, step], source.stem.conv.weight[:, :, 0] / 5)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as handle:
        pickle.dump({"blobs": {"conv1_w": np.zeros(3, np.float32), "x": _RunsCode(marker)}}, handle, protocol=2)
    with pytest.raises(UnsafePickleError, match=r"refused to load (posix|nt)\.system.*nothing was executed"):
        read_blobs(evil)
    with pytest.raises(UnsafePickleError):
        convert_caffe2(evil, tmp_path / "out.pt", "c2d_r50")
    assert not marker.exists()
    assert not (tmp_path / "out.pt").exists()
    # Proof that the same file does run code with the standard unpickler.
    with open(evil, "rb") as handle:
        pickle.load(handle)
    assert marker.exists()


def test_python2_numpy1_names_and_bad_files(tmp_path: Path) -> None:
    arrays = {"blobs": {"conv1_w": np.arange(6, dtype=np.float32).reshape(2, 3), "model_iter": 5}}
    data = pickle.dumps(arrays, protocol=2)
    # Files from Python 2 / numpy 1 name numpy.core.multiarray; protocol 2 bytes go through _codecs.encode.
    legacy = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert legacy != data and b"_codecs" in legacy
    path = tmp_path / "legacy.pkl"
    path.write_bytes(legacy)
    blobs = read_blobs(path)
    assert list(blobs) == ["conv1_w"] and np.array_equal(blobs["conv1_w"], arrays["blobs"]["conv1_w"])
    path.write_bytes(legacy[: len(legacy) // 2])
    with pytest.raises(ValueError, match="not a readable Caffe2 pickle"):
        read_blobs(path)
    path.write_bytes(pickle.dumps(["not", "a", "dict"], protocol=2))
    with pytest.raises(ValueError, match="expected a dict of blobs"):
        read_blobs(path)
