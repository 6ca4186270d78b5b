"""COCO-format detection data: flips that swap left/right keypoints, skipping bad input, built-in shapes."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from nlnet.data.coco import (
    CocoDetection,
    collate_detection,
    flip_map_from_names,
    hflip_target,
    make_shapes_coco,
)

COCO_PERSON = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
    "right_knee", "left_ankle", "right_ankle",
]  # fmt: skip


def test_flip_map_pairs_coco_person_keypoints() -> None:
    assert flip_map_from_names(COCO_PERSON) == [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
    assert flip_map_from_names(["top", "left", "bottom", "right"]) == [0, 3, 2, 1]
    assert flip_map_from_names(["top_left", "top_right", "centre"]) == [1, 0, 2]


def test_hflip_target_mirrors_and_swaps() -> None:
    target = {
        "boxes": torch.tensor([[10.0, 5.0, 30.0, 25.0]]),
        "masks": torch.zeros(1, 40, 50, dtype=torch.uint8),
        # top, left, bottom, right; the bottom one is unlabelled
        "keypoints": torch.tensor(
            [[[20.0, 5.0, 2.0], [10.0, 15.0, 2.0], [0.0, 0.0, 0.0], [30.0, 14.0, 1.0]]]
        ),
    }
    target["masks"][0, 5:25, 10:30] = 1
    flipped = hflip_target(target, width=50, flip_map=[0, 3, 2, 1])
    assert flipped["boxes"].tolist() == [[20.0, 5.0, 40.0, 25.0]]
    assert flipped["masks"][0, 5:25, 20:40].all() and flipped["masks"].sum() == 400
    # the new "left" is the old "right" mirrored, and the other way round; unlabelled stays (0, 0, 0)
    assert flipped["keypoints"].tolist() == [
        [[30.0, 5.0, 2.0], [20.0, 14.0, 1.0], [0.0, 0.0, 0.0], [40.0, 15.0, 2.0]]
    ]
    twice = hflip_target(flipped, width=50, flip_map=[0, 3, 2, 1])
    for key in target:
        assert torch.equal(twice[key], target[key])
    with pytest.raises(ValueError, match="flip_map"):
        hflip_target(target, width=50)


def test_shapes_keypoint_set_flips_correctly(tmp_path) -> None:
    image_dir, ann = make_shapes_coco(tmp_path, "train", num_images=3, task="keypoints", seed=5)
    plain = CocoDetection(image_dir, ann, task="keypoints")
    flipped = CocoDetection(image_dir, ann, task="keypoints", train=True, flip_prob=1.0)
    assert plain.keypoint_names == ["top", "left", "bottom", "right"] and plain.num_classes == 2
    image, target = plain[0]
    image_f, target_f = flipped[0]
    width = image.shape[-1]
    assert torch.equal(image_f, image.flip(-1))
    kp, kp_f = target["keypoints"], target_f["keypoints"]
    assert kp.shape[1:] == (4, 3) and (kp[..., 2] == 2).all()
    # after the flip the leftmost corner is the old rightmost one
    assert torch.allclose(kp_f[:, 1, 0], width - kp[:, 3, 0]) and torch.equal(kp_f[:, 1, 1], kp[:, 3, 1])
    assert torch.allclose(kp_f[:, 0, 0], width - kp[:, 0, 0])
    assert (kp_f[:, 1, 0] < kp_f[:, 3, 0]).all()  # "left" is still left of "right"
    # every corner lies inside its box
    boxes = target_f["boxes"]
    assert (kp_f[..., 0] >= boxes[:, None, 0] - 1e-3).all() and (
        kp_f[..., 0] <= boxes[:, None, 2] + 1e-3
    ).all()


def test_shapes_instances_are_deterministic_and_masks_match_polygons(tmp_path) -> None:
    image_dir, ann = make_shapes_coco(tmp_path / "a", "val", num_images=4, seed=3)
    _, ann_again = make_shapes_coco(tmp_path / "b", "val", num_images=4, seed=3)
    assert ann.read_text() == ann_again.read_text()
    dataset = CocoDetection(image_dir, ann)
    data = json.loads(ann.read_text())
    assert len(dataset) == 4 and dataset.num_classes == 4 and dict(dataset.skipped) == {}
    image, target = dataset[0]
    assert image.dtype == torch.float32 and image.shape[0] == 3 and 0.0 <= image.min() <= image.max() <= 1.0
    anns = [a for a in data["annotations"] if a["image_id"] == target["image_id"]]
    assert target["masks"].shape == (len(anns), image.shape[1], image.shape[2])
    for mask, annotation, box in zip(target["masks"], anns, target["boxes"], strict=True):
        # rasterised area within a pixel-wide rim of the polygon's exact area
        assert abs(int(mask.sum()) - annotation["area"]) < 0.25 * annotation["area"] + 10
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert (
            box[0] - 1 <= xs.min()
            and xs.max() <= box[2] + 1
            and box[1] - 1 <= ys.min()
            and ys.max() <= box[3] + 1
        )


def test_bad_input_is_skipped_with_a_warning_and_counted(tmp_path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((40, 50, 3), 100, dtype=np.uint8)).save(images / "good.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    square = [10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "segmentation": [square]},
        {
            "id": 2,
            "image_id": 1,
            "category_id": 1,
            "bbox": [5, 5, 0, 10],
            "segmentation": [square],
        },  # zero width
        {
            "id": 3,
            "image_id": 1,
            "category_id": 1,
            "bbox": [60, 5, 10, 10],
            "segmentation": [square],
        },  # outside
        {
            "id": 4,
            "image_id": 1,
            "category_id": 1,
            "bbox": [1, 1, 9, 9],
            "segmentation": [[1, 1, 5, 5, 9, 9]],
        },
        {"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, 9, 9], "segmentation": [[1, 1, 5, 5]]},
        {"id": 6, "image_id": 2, "category_id": 1, "bbox": [1, 1, 9, 9], "segmentation": [square]},
        {"id": 7, "image_id": 3, "category_id": 1, "bbox": [1, 1, 9, 9], "segmentation": [square]},
    ]
    for a in annotations:
        a.update(iscrowd=0, area=100.0)
    dataset_json = {
        "images": [
            {"id": 1, "file_name": "good.png", "width": 50, "height": 40},
            {"id": 2, "file_name": "broken.png", "width": 50, "height": 40},
            {"id": 3, "file_name": "missing.png", "width": 50, "height": 40},
        ],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "square"}],
    }
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(dataset_json))
    with pytest.warns(UserWarning, match="skipped") as record:
        dataset = CocoDetection(images, ann)
    assert dict(dataset.skipped) == {"missing_image": 1, "degenerate_box": 2, "degenerate_polygon": 2}
    assert {str(w.message).split(" x ")[-1].split(" ")[0] for w in record} == set(dataset.skipped)
    assert dataset.image_ids == [1, 2]
    _, target = dataset[0]
    assert target["boxes"].tolist() == [[10.0, 10.0, 30.0, 30.0]] and target["masks"].sum() == 400
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = collate_detection([dataset[0], dataset[1]])
    assert any("unreadable image" in str(w.message) for w in caught)
    images_out, targets_out, unreadable = batch
    assert len(images_out) == 1 and targets_out[0]["image_id"] == 1 and unreadable == [2]


def test_bad_arguments_are_value_errors(tmp_path) -> None:
    _, ann = make_shapes_coco(tmp_path, "val", num_images=1, seed=0)
    with pytest.raises(ValueError, match="task must be one of"):
        CocoDetection(tmp_path, ann, task="panoptic")
    with pytest.raises(ValueError, match="no category declares 'keypoints'"):
        CocoDetection(tmp_path, ann, task="keypoints")
    with pytest.raises(FileNotFoundError):
        CocoDetection(tmp_path, tmp_path / "none.json")
