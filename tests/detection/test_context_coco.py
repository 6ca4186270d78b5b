"""The built-in context set: labels re-derived from pixels, local evidence that cannot decide, keypoint AP by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from nlnet.data.coco import CocoDetection
from nlnet.data.context_coco import (
    CUE_GAP,
    CUE_NAMES,
    CUE_ROWS,
    SIDE_BAR,
    SIDE_GAP,
    cue_of_pixels,
    draw_context_image,
    make_context_coco,
)
from nlnet.engine import coco_eval


def _load(image_dir, annotation_file):
    data = json.loads(annotation_file.read_text())
    pixels = {i["id"]: np.asarray(Image.open(image_dir / i["file_name"]).convert("RGB")) for i in data["images"]}
    return data, pixels


def test_instance_labels_are_the_cue_read_from_the_pixels(tmp_path) -> None:
    image_dir, ann = make_context_coco(tmp_path, "train", num_images=30, task="instances", seed=3)
    data, pixels = _load(image_dir, ann)
    names = {c["id"]: c["name"] for c in data["categories"]}
    seen = set()
    for a in data["annotations"]:
        cue = cue_of_pixels(pixels[a["image_id"]])
        assert names[a["category_id"]] == cue
        seen.add(cue)
        # every object lies wholly below the bar and the gap
        assert a["bbox"][1] >= CUE_ROWS + CUE_GAP - 1e-6
    assert seen == set(CUE_NAMES)  # all three classes occur
    # the same arguments give the same files; the dataset reads them with one class per cue
    again = make_context_coco(tmp_path / "again", "train", num_images=30, task="instances", seed=3)
    assert json.loads(again[1].read_text())["annotations"] == data["annotations"]
    assert CocoDetection(image_dir, ann).num_classes == 4


def test_side_layout_puts_the_cue_down_an_edge_far_from_every_object(tmp_path) -> None:
    image_dir, ann = make_context_coco(
        tmp_path, "train", num_images=30, task="instances", seed=3, image_size=(96, 112), layout="side"
    )
    data, pixels = _load(image_dir, ann)
    names = {c["id"]: c["name"] for c in data["categories"]}
    sizes = {i["id"]: (i["width"], i["height"]) for i in data["images"]}
    sides, cues = set(), set()
    for a in data["annotations"]:
        image = pixels[a["image_id"]]
        width, height = sizes[a["image_id"]]
        assert 96 <= height <= 112 and 96 + SIDE_BAR + SIDE_GAP <= width <= 112 + SIDE_BAR + SIDE_GAP
        cue = cue_of_pixels(image)
        assert names[a["category_id"]] == cue
        cues.add(cue)
        # the bar is the saturated edge; the object lies SIDE_GAP px or more beyond its inner edge
        left_bar = int(np.ptp(image[:, :SIDE_BAR].reshape(-1, 3).mean(axis=0))) > 100
        right_bar = int(np.ptp(image[:, -SIDE_BAR:].reshape(-1, 3).mean(axis=0))) > 100
        assert left_bar != right_bar
        x, _, w, _ = a["bbox"]
        if left_bar:
            assert x >= SIDE_BAR + SIDE_GAP - 1e-6
        else:
            assert x + w <= width - SIDE_BAR - SIDE_GAP + 1e-6
        sides.add(left_bar)
    assert sides == {True, False} and cues == set(CUE_NAMES)
    # the top layout's files are a different set, in other files
    top = make_context_coco(tmp_path, "train", num_images=30, task="instances", seed=3)
    assert top[1] != ann and json.loads(top[1].read_text())["info"]["generator"]["layout"] == "top"


def test_keypoint_names_turn_with_the_cue(tmp_path) -> None:
    image_dir, ann = make_context_coco(tmp_path, "train", num_images=20, task="keypoints", seed=3)
    data, pixels = _load(image_dir, ann)
    cues = set()
    for a in data["annotations"]:
        cue = cue_of_pixels(pixels[a["image_id"]])
        cues.add(cue)
        xy = np.asarray(a["keypoints"], dtype=float).reshape(4, 3)[:, :2]
        named_top, named_left = xy[0], xy[1]
        # the geometric corners, from the polygon: topmost and leftmost
        corners = np.asarray(a["segmentation"][0], dtype=float).reshape(4, 2)
        topmost, bottommost = corners[corners[:, 1].argmin()], corners[corners[:, 1].argmax()]
        leftmost, rightmost = corners[corners[:, 0].argmin()], corners[corners[:, 0].argmax()]
        if cue == "red":
            assert np.allclose(named_top, topmost) and np.allclose(named_left, leftmost)
        else:
            assert cue == "blue"
            assert np.allclose(named_top, bottommost) and np.allclose(named_left, rightmost)
    assert cues == {"red", "blue"}


@pytest.mark.parametrize("layout, width", [("top", 140), ("side", 506)])
@pytest.mark.parametrize("task, cues", [("instances", ("red", "green", "blue")), ("keypoints", ("red", "blue"))])
def test_local_evidence_cannot_decide(task: str, cues: tuple[str, ...], layout: str, width: int) -> None:
    # one scene under every cue: identical pixels off the bar, the same boxes, different labels
    drawn = [draw_context_image("7/1/scene", cue, task, width, 130, 3, layout) for cue in cues]
    images = [np.asarray(image) for image, _ in drawn]
    changed = np.any(images[0] != images[1], axis=2)
    rows, cols = changed.nonzero()
    if layout == "top":
        assert rows.max() < CUE_ROWS
    else:  # one edge strip, all rows
        assert cols.max() - cols.min() == SIDE_BAR - 1 and (cols.min() == 0 or cols.max() == width - 1)
        assert set(rows) == set(range(130))
    for other in images[2:]:
        assert np.array_equal(np.any(images[0] != other, axis=2), changed)
    polygons = [[o["polygon"] for o in objects] for _, objects in drawn]
    assert all(p == polygons[0] for p in polygons) and polygons[0]
    if task == "instances":
        labels = {tuple(o["category_id"] for o in objects) for _, objects in drawn}
    else:
        labels = {tuple(tuple(o["keypoints"][0]) for o in objects) for _, objects in drawn}  # where "top" is
    assert len(labels) == len(cues)
    assert [cue_of_pixels(np.asarray(image)) for image, _ in drawn] == list(cues)


def test_the_generated_set_is_made_of_such_scenes(tmp_path) -> None:
    image_dir, ann = make_context_coco(tmp_path, "val", num_images=3, task="instances", seed=5)
    data, pixels = _load(image_dir, ann)
    for info in data["images"]:
        index = info["id"] - 1
        size = (info["width"], info["height"])
        image, objects = draw_context_image(f"5/{index}/scene", info["cue"], "instances", *size, 3)
        assert np.array_equal(np.asarray(image), pixels[info["id"]])
        assert len(objects) == sum(a["image_id"] == info["id"] for a in data["annotations"])


def test_bad_arguments_are_value_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="112 <= low <= high"):
        make_context_coco(tmp_path, "train", num_images=2, image_size=(64, 72))
    with pytest.raises(ValueError, match="cue must be one of"):
        draw_context_image("0", "green", "keypoints", 128, 128, 2)
    with pytest.raises(ValueError, match="task must be one of"):
        make_context_coco(tmp_path, "train", num_images=2, task="panoptic")
    with pytest.raises(ValueError, match="layout must be one of"):
        make_context_coco(tmp_path, "train", num_images=2, layout="bottom")
    with pytest.raises(ValueError, match="64 <= low <= high"):
        make_context_coco(tmp_path, "train", num_images=2, image_size=(48, 72), layout="side")


def test_keypoint_ap_equals_a_hand_computation() -> None:
    # two kites of area 400 far apart; detection 1 (score 0.9) has OKS 0.92 with kite 1, detection 2 (score 0.8)
    # OKS 0.62 with kite 2. OKS = mean_k exp(-d^2 / (2 * area * (2 sigma)^2)), so a shift of d in x on every
    # keypoint gives OKS = exp(-d^2 / (2 * 400 * 0.04)).
    sigma, area = 0.1, 400.0
    corners = [(20.0, 10.0), (10.0, 20.0), (20.0, 30.0), (30.0, 20.0)]

    def kite(ann_id: int, dx: float) -> dict:
        points = [(x + dx, y) for x, y in corners]
        return {
            "id": ann_id,
            "image_id": 1,
            "category_id": 1,
            "bbox": [10.0 + dx, 10.0, 20.0, 20.0],
            "area": area,
            "iscrowd": 0,
            "num_keypoints": 4,
            "keypoints": [v for x, y in points for v in (x, y, 2)],
        }

    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "file_name": "1.png", "height": 100, "width": 200}],
        "annotations": [kite(1, 0.0), kite(2, 120.0)],
        "categories": [{"id": 1, "name": "kite", "keypoints": ["top", "left", "bottom", "right"]}],
    }
    coco.createIndex()

    def shift(oks: float) -> float:
        return math.sqrt(-math.log(oks) * 2 * area * (2 * sigma) ** 2)

    detections = []
    for gt, oks, score in ((kite(1, 0.0), 0.92, 0.9), (kite(2, 120.0), 0.62, 0.8)):
        xy = np.asarray(gt["keypoints"], dtype=float).reshape(4, 3)
        xy[:, 0] += shift(oks)
        detections.append({"image_id": 1, "category_id": 1, "keypoints": xy.ravel().tolist(), "score": score})
    metrics = coco_eval.coco_evaluate(
        coco, {"keypoints": detections}, [1], kpt_oks_sigmas=[sigma] * 4, verbose=False
    )
    # thresholds 0.50, 0.55, 0.60: both match, AP 1. 0.65 .. 0.90: only the first (the higher score) does,
    # precision 1 up to recall 0.5: 51 of COCO's 101 recall points. 0.95: none.
    expected = (3 * 1.0 + 6 * 51 / 101 + 0.0) / 10
    assert metrics["keypoints"]["AP"] == pytest.approx(expected, abs=1e-9)
    assert metrics["keypoints"]["AP50"] == pytest.approx(1.0)
    assert metrics["keypoints"]["AP75"] == pytest.approx(51 / 101)
