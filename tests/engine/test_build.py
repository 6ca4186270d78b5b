"""The one recipe -> model builder: video recipes (inflation, starting checkpoints) and detector recipes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.models.detection import KeypointRCNN

from nlnet.engine.build import build_model, load_model_weights
from nlnet.engine.config import complete_config
from nlnet.engine.detection import load_config as load_detection_config
from nlnet.models import ResNet3d


def test_starting_weights_with_a_different_classifier(tmp_path, tiny_recipe, video_set):
    recipe = complete_config(tiny_recipe(video_set, tmp_path))
    source = build_model(recipe.model)
    torch.save({"model": source.state_dict()}, tmp_path / "kinetics.pt")
    recipe.model.num_classes = 5
    target = build_model(recipe.model)
    report = load_model_weights(target, tmp_path / "kinetics.pt")
    assert report["shape_mismatch"] == ["head.fc.bias", "head.fc.weight"]
    assert not report["missing"] and not report["unexpected"]
    assert torch.equal(target.state_dict()["stem.conv.weight"], source.state_dict()["stem.conv.weight"])
    with pytest.raises(ValueError, match="convert_caffe2"):
        load_model_weights(target, tmp_path / "official.pkl")


def test_recipe_inflates_imagenet_weights_from_model_pretrained_2d(tmp_path, tiny_recipe, video_set):
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    imagenet = ResNet(Bottleneck, [1, 1, 1, 1]).state_dict()  # torchvision layout, 1 block per stage
    torch.save(imagenet, tmp_path / "resnet_imagenet.pth")
    recipe = complete_config(
        tiny_recipe(
            video_set,
            tmp_path,
            model__name="i3d_r50",
            model__pretrained_2d=str(tmp_path / "resnet_imagenet.pth"),
            model__overrides__base_width=64,
        )
    )
    stem = build_model(recipe.model).state_dict()["stem.conv.weight"]  # (64, 3, 5, 7, 7), I3D stem
    expected = imagenet["conv1.weight"].unsqueeze(2).repeat(1, 1, 5, 1, 1) / 5
    torch.testing.assert_close(stem, expected)


def test_recipe_starts_from_a_converted_official_checkpoint(tmp_path, tiny_recipe, video_set):
    from nlnet.weights.caffe2 import convert_caffe2, export_caffe2

    recipe = complete_config(tiny_recipe(video_set, tmp_path))
    source = build_model(recipe.model)
    overrides = OmegaConf.to_container(recipe.model.overrides)
    export_caffe2(source, tmp_path / "official.pkl")  # the official Caffe2 blob layout
    convert_caffe2(tmp_path / "official.pkl", tmp_path / "converted.pt", recipe.model.name, **overrides)
    recipe.model.checkpoint = str(tmp_path / "converted.pt")
    torch.manual_seed(1)  # a different initialisation, overwritten by the checkpoint
    loaded = build_model(recipe.model).state_dict()
    for name, tensor in source.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            torch.testing.assert_close(loaded[name], tensor, msg=name)


def test_a_video_recipe_and_a_detector_recipe_build_through_the_one_function(tmp_path, tiny_recipe, video_set):
    video = build_model(complete_config(tiny_recipe(video_set, tmp_path)).model)
    assert isinstance(video, ResNet3d)
    recipe = load_detection_config(None, ["model.name=keypointrcnn_r50_fpn", "data.task=keypoints"])
    # The builder reads only these three attributes of a detection dataset: no images are needed.
    dataset = SimpleNamespace(task="keypoints", num_classes=2, keypoint_names=["head", "tail", "tip"])
    detector = build_model(recipe.model, dataset)
    assert isinstance(detector, KeypointRCNN)
    assert detector.roi_heads.keypoint_predictor.kps_score_lowres.out_channels == 3
    with pytest.raises(ValueError, match="sized by its dataset"):
        build_model(recipe.model)
