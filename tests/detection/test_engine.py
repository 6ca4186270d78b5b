"""Detection engine: COCOeval against hand-computed AP, configs, train + eval end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_detector import SMALL_PROPOSALS
from torch import nn

from nlnet.cli import main
from nlnet.data.coco import CocoDetection, make_shapes_coco
from nlnet.engine import coco_eval
from nlnet.engine import detection as engine

THRESHOLDS = np.linspace(0.5, 0.95, 10)


class _FixedDetector(nn.Module):
    """Returns given detections for images of given sizes, as a trained torchvision detector would."""

    def __init__(self, by_size: dict[tuple[int, int], dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # evaluate() reads the device from a parameter
        self.by_size = by_size

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [self.by_size[tuple(image.shape[-2:])] for image in images]


def _box_iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _write_case(tmp_path):
    """Three images, two classes, one ground-truth rectangle each; image 3's file is corrupt."""
    images = tmp_path / "images"
    images.mkdir()
    sizes = {1: (64, 80), 2: (60, 90)}
    for image_id, (h, w) in sizes.items():
        Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8)).save(images / f"{image_id}.png")
    (images / "3.png").write_bytes(b"not a png")
    rects = {
        1: (1, [10.0, 10.0, 40.0, 30.0]),
        2: (2, [40.0, 20.0, 60.0, 40.0]),
        3: (1, [5.0, 5.0, 25.0, 25.0]),
    }
    annotations = []
    for image_id, (category, (x1, y1, x2, y2)) in rects.items():
        annotations.append(
            {
                "id": image_id,
                "image_id": image_id,
                "category_id": category,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
                "area": (x2 - x1) * (y2 - y1),
                "iscrowd": 0,
            }
        )
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 80} for i in (1, 3)]
        + [{"id": 2, "file_name": "2.png", "height": 60, "width": 90}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(data))
    return images, ann, rects


def test_coco_evaluation_matches_hand_computed_ap(tmp_path) -> None:
    images, ann, rects = _write_case(tmp_path)
    dataset = CocoDetection(images, ann)  # the corrupt file exists: it is found only when decoded
    gt_masks = {dataset[i][1]["image_id"]: dataset[i][1]["masks"][0] for i in (0, 1)}
    exact, duplicate, shifted = rects[1][1], [13.0, 13.0, 43.0, 33.0], [43.0, 23.0, 63.0, 43.0]
    shifted_mask = torch.roll(gt_masks[2], shifts=(3, 3), dims=(0, 1))
    duplicate_mask = torch.roll(gt_masks[1], shifts=(3, 3), dims=(0, 1))
    outputs = {
        (
            64,
            80,
        ): {  # image 1, class 1: an exact detection and a lower-scored shifted duplicate (a false positive)
            "boxes": torch.tensor([exact, duplicate]),
            "labels": torch.tensor([1, 1]),
            "scores": torch.tensor([0.9, 0.5]),
            "masks": torch.stack([gt_masks[1], duplicate_mask])[:, None].float(),
        },
        (60, 90): {  # image 2, class 2: a detection shifted by (+3, +3)
            "boxes": torch.tensor([shifted]),
            "labels": torch.tensor([2]),
            "scores": torch.tensor([0.8]),
            "masks": shifted_mask[None, None].float(),
        },
    }
    with pytest.warns(UserWarning, match="unreadable"):
        result = coco_eval.evaluate(_FixedDetector(outputs), dataset, output_dir=tmp_path / "out", verbose=False)

    # Class 1 is found first at every IoU threshold (AP 1); class 2 only at thresholds <= its IoU. The corrupt
    # image 3 is left out: counting its ground truth as missed would halve class 1's recall.
    assert result["num_images"] == 2 and result["unreadable"] == [3]
    box_iou = _box_iou(rects[2][1], shifted)
    mask_iou = float((gt_masks[2] & shifted_mask).sum() / (gt_masks[2] | shifted_mask).sum())
    for iou_type, iou in (("bbox", box_iou), ("segm", mask_iou)):
        class_2 = float((iou >= THRESHOLDS).mean())
        stats = result["metrics"][iou_type]
        assert stats["AP"] == pytest.approx((1.0 + class_2) / 2, abs=1e-9)
        assert stats["AP50"] == pytest.approx(1.0)
        assert stats["AP75"] == pytest.approx(0.5)
        assert stats["APl"] == -1.0  # no ground truth above 96^2 pixels
    assert 0.55 < box_iou < 0.6  # two thresholds pass: AP = 0.6
    saved = json.loads((tmp_path / "out" / "detections_bbox.json").read_text())
    assert sorted((d["image_id"], d["category_id"], d["score"]) for d in saved) == [
        (1, 1, pytest.approx(0.5)),
        (1, 1, pytest.approx(0.9)),
        (2, 2, pytest.approx(0.8)),
    ]
    assert saved[0]["bbox"] == pytest.approx([10.0, 10.0, 30.0, 20.0])  # xywh


def test_keypoint_ap_exact_and_far(tmp_path) -> None:
    image_dir, ann = make_shapes_coco(tmp_path, "val", num_images=2, task="keypoints", seed=4)
    dataset = CocoDetection(image_dir, ann, task="keypoints")
    targets = [dataset[i][1] for i in range(len(dataset))]
    image_ids = [t["image_id"] for t in targets]

    def outputs(offset: float) -> list[dict[str, torch.Tensor]]:
        return [
            {
                "boxes": t["boxes"],
                "labels": t["labels"],
                "scores": torch.ones(len(t["labels"])),
                "keypoints": t["keypoints"] + torch.tensor([offset, offset, 0.0]),
            }
            for t in targets
        ]

    sigmas = [0.1] * 4
    for offset, expected in ((0.0, 1.0), (60.0, 0.0)):
        results = coco_eval.predictions_to_coco(outputs(offset), image_ids, dataset.category_ids)
        metrics = coco_eval.coco_evaluate(
            dataset.coco, {"keypoints": results["keypoints"]}, image_ids, kpt_oks_sigmas=sigmas, verbose=False
        )
        assert metrics["keypoints"]["AP"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="OKS sigma"):
        coco_eval.evaluate(_FixedDetector({}), dataset, verbose=False)


def test_class_report_by_hand() -> None:
    """Image 1: objects A (class 1) and B (class 2); image 2: object C (class 1), never detected."""
    from pycocotools.coco import COCO

    boxes = {"A": [10.0, 10.0, 20.0, 20.0], "B": [50.0, 10.0, 20.0, 30.0], "C": [5.0, 5.0, 30.0, 30.0]}
    truth = [("A", 1, 1), ("B", 1, 2), ("C", 2, 1)]
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i, "height": 100, "width": 100} for i in (1, 2)],
        "annotations": [
            {"id": k, "image_id": image, "category_id": category, "bbox": boxes[name], "iscrowd": 0,
             "area": boxes[name][2] * boxes[name][3]}
            for k, (name, image, category) in enumerate(truth, start=1)
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    gt.createIndex()
    detections = [
        {"image_id": 1, "category_id": 2, "bbox": boxes["A"], "score": 0.9},  # on A, wrong class, best on A
        {"image_id": 1, "category_id": 1, "bbox": boxes["A"], "score": 0.3},  # on A, right class, lower
        {"image_id": 1, "category_id": 2, "bbox": boxes["B"], "score": 0.8},  # on B, right class
        {"image_id": 1, "category_id": 1, "bbox": [80.0, 80.0, 10.0, 10.0], "score": 0.2},  # on nothing
    ]
    report = coco_eval.class_report(gt, detections, [1, 2])
    assert report["found"] == pytest.approx(2 / 3)
    assert report["right_class"] == pytest.approx(1 / 2)
    # classes ignored: 0.9 and 0.8 hit A and B, 0.3 (a second box on A) and 0.2 miss; recall ends at 2/3 with
    # precision 1 up to it, so 67 of COCO's 101 recall points (0, 0.01, ..., 0.66) score 1 at every IoU
    assert report["agnostic_AP"] == pytest.approx(67 / 101)
    assert report["agnostic_AR100"] == pytest.approx(2 / 3)
    # with the classes, A's only right box ranks below B's: the two-class AP is lower
    per_class = coco_eval.coco_evaluate(gt, {"bbox": detections}, [1, 2], verbose=False)["bbox"]["AP"]
    assert per_class < report["agnostic_AP"]
    empty = coco_eval.class_report(gt, [], [1, 2])
    assert empty["found"] == 0.0 and empty["right_class"] is None and empty["agnostic_AP"] == 0.0


def test_config_rejects_unknown_keys_and_mismatched_task(tmp_path) -> None:
    cfg = engine.load_config(None, ["train.max_iter=7", "model.overrides.min_size=99"])
    assert cfg.train.max_iter == 7 and cfg.model.overrides.min_size == 99
    with pytest.raises(ValueError, match="invalid detection configuration"):
        engine.load_config(None, ["train.max_iters=7"])
    with pytest.raises(ValueError, match="data.task=keypoints"):
        engine.load_config(None, ["model.name=keypointrcnn_r50_fpn"])
    with pytest.raises(ValueError, match="data.format='coco' needs"):
        engine.load_config(None, ["data.format=coco"])


def _tiny(tmp_path, run: str, max_iter: int) -> list[str]:
    return [
        f"output_dir={tmp_path / run}",
        f"data.root={tmp_path / 'data'}",
        "data.shapes_train_images=4",
        "data.shapes_val_images=2",
        "data.shapes_image_size=[64,72]",
        "model.overrides.min_size=64",
        "model.overrides.max_size=72",
        f"train.max_iter={max_iter}",
        "train.warmup_iters=2",
        "train.decay_steps=[3]",
        "train.checkpoint_period=1",
        "train.log_period=1",
        "test.batch_size=2",
    ]


def _smallest(tmp_path, run: str, max_iter: int) -> list[str]:
    # `_tiny` (64-pixel images, the shapes set's smallest) with a few dozen proposals and RoI samples.
    return [
        *_tiny(tmp_path, run, max_iter),
        *SMALL_PROPOSALS,
    ]


def _assert_resume_is_exact(tmp_path, options, steps: int) -> None:
    # Train `steps` straight; train 1 step, then resume to `steps`: every weight and buffer must be equal.
    no_eval = ["train.eval_at_end=false"]
    engine.train(engine.load_config(None, [*options(tmp_path, "straight", steps), *no_eval]))
    engine.train(engine.load_config(None, [*options(tmp_path, "resumed", 1), *no_eval]))
    engine.train(engine.load_config(None, [*options(tmp_path, "resumed", steps), *no_eval]), resume=True)
    name = f"checkpoint_{steps:08d}.pt"
    straight = torch.load(tmp_path / "straight" / name, weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / name, weights_only=True)
    assert straight["model"].keys() == resumed["model"].keys()
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_cli_train_then_eval_on_the_builtin_set(tmp_path, capsys) -> None:
    torch.set_num_threads(1)
    assert main(["detect", "train", *_tiny(tmp_path, "run", 2)]) == 0
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint_*.pt")) == [
        "checkpoint_00000001.pt",
        "checkpoint_00000002.pt",
    ]
    trained = json.loads((run / "results.json").read_text())
    assert set(trained["metrics"]) == {"bbox", "segm", "classes"} and len(trained["metrics"]["bbox"]) == 12
    assert set(trained["metrics"]["classes"]) == {"agnostic_AP", "agnostic_AR100", "found", "right_class"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["event"] == "train"] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in records if r["event"] == "train")
    capsys.readouterr()

    out = tmp_path / "eval"
    args = ["detect", "eval", "--checkpoint", str(run / "checkpoint_00000002.pt"), "--output-dir", str(out)]
    assert main([*args, *_tiny(tmp_path, "run", 2)]) == 0
    printed = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in printed
    evaluated = json.loads((out / "results.json").read_text())
    assert evaluated["metrics"] == trained["metrics"]  # the checkpoint is the model that was evaluated
    assert json.loads((out / "detections_segm.json").read_text()) == json.loads(
        (run / "detections_segm.json").read_text()
    )
    capsys.readouterr()
    assert main(["detect", "train", *_tiny(tmp_path, "run", 2)]) == 2  # the run exists: one line, exit 2
    assert "--resume" in capsys.readouterr().err


def test_resumed_training_equals_uninterrupted_at_the_smallest_size(tmp_path) -> None:
    # With the res4 block's learning rate at ten times the rest's: its groups resume with the rest.
    torch.set_num_threads(1)

    def options(tmp, run, max_iter):
        return [*_smallest(tmp, run, max_iter), "train.nonlocal_lr_mult=10"]

    _assert_resume_is_exact(tmp_path, options, 2)
    state = torch.load(tmp_path / "resumed" / "checkpoint_00000002.pt", weights_only=True)
    groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
    assert sorted(groups) == ["bn", "bn_scaled", "decay", "decay_scaled"]  # the block has its BN (the default)
    assert groups["decay_scaled"]["lr"] == pytest.approx(10 * groups["decay"]["lr"])
    assert groups["bn_scaled"]["lr"] == pytest.approx(10 * groups["bn"]["lr"])
    block = [k for k in state["model"] if k.startswith("backbone.body.layer3.nonlocal_after_")]
    scaled = len(groups["decay_scaled"]["params"]) + len(groups["bn_scaled"]["params"])
    assert scaled == len([k for k in block if k.endswith(("weight", "bias"))]) > 0


@pytest.mark.slow
def test_resumed_training_equals_uninterrupted(tmp_path) -> None:
    torch.set_num_threads(1)
    _assert_resume_is_exact(tmp_path, _tiny, 3)


def test_every_detection_recipe_loads() -> None:
    from nlnet.engine.config import available_recipes

    recipes = [name for name in available_recipes() if name.startswith("detection/")]
    assert len(recipes) >= 5
    for recipe in recipes:
        cfg = engine.load_config(recipe)
        assert cfg.data.task == ("keypoints" if "keypoint" in cfg.model.name else "instances")


def _torchrun_train(tmp_path, options) -> tuple[dict, list[dict]]:
    # Two real processes (torch.distributed.run, gloo on the CPU) train 2 steps and evaluate 3 val images.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "nlnet", "detect", "train", *options(tmp_path, "ddp", 2), "data.shapes_val_images=3"]
    subprocess.run(command, check=True, env=env, timeout=600, capture_output=True)
    result = json.loads((tmp_path / "ddp" / "results.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    return result, records


def test_torchrun_two_processes_train_and_evaluate_at_the_smallest_size(tmp_path) -> None:
    result, records = _torchrun_train(tmp_path, _smallest)
    assert result["num_images"] == 3  # the two processes' shards of the val set, gathered
    assert [r["iter"] for r in records if r["event"] == "train"] == [1, 2]


@pytest.mark.slow
def test_torchrun_two_processes_train_and_evaluate(tmp_path) -> None:
    result, records = _torchrun_train(tmp_path, _tiny)
    assert result["num_images"] == 3  # the two processes' shards of the val set, gathered
    assert [r["iter"] for r in records if r["event"] == "train"] == [1, 2]
