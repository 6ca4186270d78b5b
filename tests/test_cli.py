"""The command line: commands registered explicitly, a checkpoint that brings its recipe, bad input in one line.

Runs are real and tiny: a built-in set of 8 training clips, one iteration; a shapes Keypoint R-CNN of one step
(slow: ``make test-all``).
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_builtin import TINY_BUILTIN

from nlnet.cli import _build_parser, main
from nlnet.engine import save_checkpoint

TINY_VIDEO = TINY_BUILTIN


@pytest.fixture(scope="module")
def video_run(tmp_path_factory):
    """The checkpoint of a one-iteration ``nlnet train`` on a tiny built-in set."""
    folder = tmp_path_factory.mktemp("video")
    torch.set_num_threads(1)
    args = ["train", "--device", "cpu", "--output-dir", str(folder / "run"), *TINY_VIDEO]
    assert main([*args, f"data.builtin.cache_dir={folder / 'cache'}"]) == 0
    return folder / "run" / "checkpoint_00000001.pt"


def error_line(capsys, argv: list[str]) -> str:
    """``main(argv)``'s stderr, checked to be one line after exit status 2."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_every_command_is_registered():
    commands = _build_parser()._subparsers._group_actions[0].choices
    assert set(commands) == {
        "train",
        "test",
        "predict",
        "detect",
        "info",
        "convert",
        "visualize",
        "demo",
        "ablate",
        "data",
    }
    detect = commands["detect"]._subparsers._group_actions[0].choices
    assert set(detect) == {"train", "eval", "cost", "demo"}
    assert set(commands["data"]._subparsers._group_actions[0].choices) == {"prepare"}


def test_test_needs_only_the_checkpoint(video_run, capsys):
    capsys.readouterr()
    assert main(["test", "--checkpoint", str(video_run), "--single-view", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "top1:" in printed
    scores = json.loads((video_run.parent / "test_checkpoint_00000001_1view.json").read_text())
    assert len(scores["videos"]) == 4


def test_a_bare_state_dict_takes_the_recipe_beside_it(video_run, tmp_path, capsys):
    bare = video_run.parent / "weights_only.pt"
    save_checkpoint(bare, torch.load(video_run, weights_only=True)["model"])
    capsys.readouterr()
    output = tmp_path / "scores.json"
    assert main(["test", "--checkpoint", str(bare), "--single-view", "--device", "cpu", "--output", str(output)]) == 0
    assert len(json.loads(output.read_text())["videos"]) == 4

    alone = tmp_path / "alone.pt"
    save_checkpoint(alone, torch.load(video_run, weights_only=True)["model"])
    err = error_line(capsys, ["test", "--checkpoint", str(alone), "--device", "cpu"])
    assert "carries no recipe" in err and "--config" in err


def test_a_missing_split_folder_says_which_split_to_use(video_run, tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / "set" / split / "circle").mkdir(parents=True)
    overrides = ["data.format=folder", f"data.root={tmp_path / 'set'}"]
    err = error_line(capsys, ["test", "--checkpoint", str(video_run), "--device", "cpu", *overrides])
    assert err.startswith("nlnet test: error: ") and "no 'test' folder" in err and "--split val" in err


def test_a_missing_pretrained_2d_file_says_where_to_get_it(tmp_path, capsys, monkeypatch):
    # A Kinetics recipe as shipped (model.pretrained_2d: pretrained/resnet50_imagenet.pth), run where that
    # file is not; a class-folder set with one clip stands in for Kinetics.
    (tmp_path / "set" / "train" / "jumping").mkdir(parents=True)
    (tmp_path / "set" / "train" / "jumping" / "a.mp4").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    overrides = ["data.format=folder", "data.root=set", "data.num_classes=1", "train.batch_size=1", "output_dir=r"]
    overrides += ["train.num_workers=0"]
    err = error_line(capsys, ["train", "--config", "kinetics_nl_i3d_r50_32x2", "--device", "cpu", *overrides])
    assert "pretrained/resnet50_imagenet.pth" in err
    assert "ResNet50_Weights.IMAGENET1K_V1" in err and "model.pretrained_2d=null" in err


def test_an_unknown_recipe_name_lists_the_shipped_ones(capsys):
    err = error_line(capsys, ["train", "--config", "kinetics_nl_i3d_r50_32x3"])
    assert "'kinetics_nl_i3d_r50_32x3'" in err and "kinetics_nl_i3d_r50_32x2" in err
    assert "detection/shapes_maskrcnn_r50" in err
    err = error_line(capsys, ["detect", "cost", "--config", "detection/no_such_recipe"])
    assert err.startswith("nlnet detect cost: error: ")


def test_an_unknown_key_is_one_line_and_debug_shows_the_traceback(capsys):
    err = error_line(capsys, ["train", "train.no_such_key=1"])
    assert "train.no_such_key" in err
    for argv in (["--debug", "train", "train.no_such_key=1"], ["train", "--debug", "train.no_such_key=1"]):
        with pytest.raises(ValueError, match="train.no_such_key"):
            main(argv)


def test_a_detection_checkpoint_brings_its_recipe(tmp_path):
    from omegaconf import OmegaConf

    from nlnet.engine import detection
    from nlnet.engine.config import recipe_of_checkpoint

    trained = detection.load_config("detection/shapes_keypointrcnn_r50", ["train.max_iter=3"])
    checkpoint = tmp_path / "checkpoint_00000003.pt"
    stored = OmegaConf.to_container(trained, resolve=True)
    save_checkpoint(checkpoint, {"format": detection.CHECKPOINT_FORMAT, "config": stored})
    recipe = detection.load_config(recipe_of_checkpoint(checkpoint))
    assert (recipe.model.name, recipe.data.task, recipe.train.max_iter) == ("keypointrcnn_r50_fpn", "keypoints", 3)


@pytest.mark.slow
def test_detect_eval_of_a_keypoint_checkpoint_needs_no_config(tmp_path, capsys):
    # About a minute on two cores (a Keypoint R-CNN R50 is built twice); the fast test above covers the recipe.
    torch.set_num_threads(1)
    tiny = [
        f"output_dir={tmp_path / 'run'}",
        f"data.root={tmp_path / 'data'}",
        "data.shapes_train_images=2",
        "data.shapes_val_images=2",
        "data.shapes_image_size=[64,72]",
        "model.overrides.min_size=64",
        "model.overrides.max_size=72",
        "train.max_iter=1",
        "train.warmup_iters=1",
        "train.decay_steps=[1]",
        "train.eval_at_end=false",
        "test.batch_size=2",
    ]
    assert main(["detect", "train", "--config", "detection/shapes_keypointrcnn_r50", "--device", "cpu", *tiny]) == 0
    checkpoint = tmp_path / "run" / "checkpoint_00000001.pt"
    capsys.readouterr()
    out = tmp_path / "eval"
    assert main(["detect", "eval", "--checkpoint", str(checkpoint), "--output-dir", str(out), "--device", "cpu"]) == 0
    assert "keypoints: AP" in capsys.readouterr().out
    assert set(json.loads((out / "results.json").read_text())["metrics"]) == {"bbox", "keypoints"}
