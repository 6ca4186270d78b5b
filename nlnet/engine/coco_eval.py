"""COCO evaluation of detectors: outputs in COCO's results format, pycocotools' ``COCOeval``, a distributed pass.

:func:`evaluate` runs a detector over a :class:`~nlnet.data.coco.CocoDetection` set (each process its share
under ``torchrun``), writes the detections in COCO's results format (:func:`predictions_to_coco`) and scores
them with ``COCOeval`` (:func:`coco_evaluate`: bbox, segm, keypoints). On a set of several categories it
also says how much of the box AP is lost to the class alone (:func:`class_report`): the box AP with every
category merged into one, and how often the best box on an object names the right category.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from nlnet.data.coco import CocoDetection, collate_detection
from nlnet.engine.distributed import DistContext, all_gather_objects
from nlnet.engine.sampler import ResumableSampler

__all__ = ["STAT_NAMES", "class_report", "coco_evaluate", "evaluate", "predictions_to_coco"]

STAT_NAMES = {
    "bbox": ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"],
    "segm": ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"],
    "keypoints": ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"],
}
_MASK_THRESHOLD = 0.5


def predictions_to_coco(
    outputs: Sequence[dict[str, torch.Tensor]],
    image_ids: Sequence[int],
    category_ids: Sequence[int],
) -> dict[str, list[dict[str, Any]]]:
    """torchvision detector outputs in COCO's results format, one list per IoU type present.

    Args:
        outputs: one dict per image with boxes (N, 4) xyxy, labels (N,) in 1..C, scores (N,), and optionally
            masks (N, 1, H, W) probabilities or keypoints (N, K, 3).
        image_ids: the COCO image id of each output.
        category_ids: COCO category id of label ``i + 1`` at index ``i``.

    Returns:
        {"bbox": [...], "segm": [...], "keypoints": [...]} (segm/keypoints only when the outputs hold them);
        masks are binarised at 0.5 and run-length encoded.
    """
    results: dict[str, list[dict[str, Any]]] = {"bbox": []}
    for output, image_id in zip(outputs, image_ids, strict=True):
        boxes = output["boxes"].detach().cpu().to(torch.float64)
        scores = output["scores"].detach().cpu().tolist()
        categories = [category_ids[int(label) - 1] for label in output["labels"].cpu()]
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for box, score, category in zip(xywh, scores, categories, strict=True):
            results["bbox"].append(
                {"image_id": int(image_id), "category_id": category, "bbox": box, "score": score}
            )
        if "masks" in output:
            segm = results.setdefault("segm", [])
            binary = (output["masks"][:, 0] > _MASK_THRESHOLD).cpu().numpy().astype(np.uint8)
            for mask, score, category in zip(binary, scores, categories, strict=True):
                rle = mask_utils.encode(np.asfortranarray(mask))
                rle["counts"] = rle["counts"].decode("ascii")
                segm.append(
                    {"image_id": int(image_id), "category_id": category, "segmentation": rle, "score": score}
                )
        if "keypoints" in output:
            entries = results.setdefault("keypoints", [])
            keypoints = output["keypoints"].detach().cpu().to(torch.float64)
            for points, score, category in zip(keypoints, scores, categories, strict=True):
                flat = points.reshape(-1).tolist()
                entries.append(
                    {"image_id": int(image_id), "category_id": category, "keypoints": flat, "score": score}
                )
    return results


def coco_evaluate(
    coco_gt: COCO,
    results: dict[str, list[dict[str, Any]]],
    image_ids: Sequence[int],
    *,
    kpt_oks_sigmas: Sequence[float] | None = None,
    verbose: bool = True,
) -> dict[str, dict[str, float]]:
    """Score detections with pycocotools' COCOeval, one IoU type at a time.

    Args:
        coco_gt: the ground truth.
        results: per IoU type, detections in COCO's results format (see :func:`predictions_to_coco`).
        image_ids: the images evaluated (images that could not be read are left out, not scored as misses).
        kpt_oks_sigmas: per-keypoint OKS sigmas; None uses COCO's person sigmas (17 keypoints).
        verbose: print COCOeval's summary table (12 numbers for bbox/segm, 10 for keypoints).

    Returns:
        {iou_type: {"AP": ..., "AP50": ..., ...}} with COCOeval's ``stats`` named by :data:`STAT_NAMES`
        (-1 where the ground truth has no instance in that area range).
    """
    metrics = {}
    for iou_type, detections in results.items():
        if iou_type not in STAT_NAMES:
            raise ValueError(f"IoU type must be one of {list(STAT_NAMES)}, got {iou_type!r}")
        evaluator = COCOeval(coco_gt, _load_results(coco_gt, detections), iouType=iou_type)
        evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        if iou_type == "keypoints" and kpt_oks_sigmas is not None:
            evaluator.params.kpt_oks_sigmas = np.asarray(kpt_oks_sigmas, dtype=np.float64)
        quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with quiet:
            if verbose:
                print(f"--- COCOeval {iou_type} ({len(detections)} detections, {len(image_ids)} images)")
            with contextlib.redirect_stdout(io.StringIO()):
                evaluator.evaluate()
                evaluator.accumulate()
            evaluator.summarize()
        metrics[iou_type] = {
            name: float(v) for name, v in zip(STAT_NAMES[iou_type], evaluator.stats, strict=True)
        }
    return metrics


def class_report(
    coco_gt: COCO, detections: Sequence[dict[str, Any]], image_ids: Sequence[int], *, iou: float = 0.5
) -> dict[str, float | None]:
    """How far the class alone keeps box detections from the ground truth.

    Args:
        coco_gt: the ground truth.
        detections: box detections in COCO's results format.
        image_ids: the images evaluated.
        iou: the overlap at which a box counts as on an object.

    Returns:
        {"agnostic_AP", "agnostic_AR100"}: COCOeval's box AP@[.5:.95] and AR@100 with the categories ignored
        (``params.useCats = 0``); {"found"}: the share of ground-truth objects (not crowds) that some box overlaps
        by ``iou`` or more; {"right_class"}: among those, the share whose highest-scoring such box has the
        object's category (None when none is found). A detector that finds the objects but guesses among C
        classes has a high agnostic AP and a right class near 1/C.
    """
    evaluator = COCOeval(coco_gt, _load_results(coco_gt, detections), iouType="bbox")
    evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    evaluator.params.useCats = 0
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    by_image: dict[int, list[dict[str, Any]]] = {}
    for detection in detections:
        by_image.setdefault(int(detection["image_id"]), []).append(detection)
    objects = found = right = 0
    for image_id in image_ids:
        truths = [a for a in coco_gt.imgToAnns.get(int(image_id), []) if not a.get("iscrowd", 0)]
        boxes = by_image.get(int(image_id), [])
        objects += len(truths)
        if not truths or not boxes:
            continue
        overlaps = mask_utils.iou(
            [b["bbox"] for b in boxes], [t["bbox"] for t in truths], [0] * len(truths)
        )  # (boxes, truths)
        scores = np.array([b["score"] for b in boxes])
        for column, truth in enumerate(truths):
            on_object = np.flatnonzero(overlaps[:, column] >= iou)
            if on_object.size:
                found += 1
                best = on_object[np.argmax(scores[on_object])]
                right += boxes[best]["category_id"] == truth["category_id"]
    return {
        "agnostic_AP": float(evaluator.stats[0]),
        "agnostic_AR100": float(evaluator.stats[8]),
        "found": found / objects if objects else None,
        "right_class": right / found if found else None,
    }


def _load_results(coco_gt: COCO, detections: Sequence[dict[str, Any]]) -> COCO:
    """The detections as a COCO object over the ground truth's images and categories."""
    if detections:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(list(detections))
    # loadRes cannot take an empty list; an empty result set scores 0 wherever there is ground truth
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": coco_gt.dataset["images"],
        "categories": coco_gt.dataset["categories"],
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: CocoDetection,
    *,
    ctx: DistContext | None = None,
    batch_size: int = 2,
    num_workers: int = 0,
    output_dir: str | Path | None = None,
    kpt_oks_sigmas: Sequence[float] | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run ``model`` over ``dataset`` and score it with COCOeval; every process calls this under torchrun.

    Args:
        model: a detector (unwrapped) on ``ctx.device``.
        dataset: the evaluation set; each process takes every ``world_size``-th image.
        ctx: the distributed context (None: one process on the model's device).
        batch_size: images per forward pass.
        num_workers: DataLoader workers.
        output_dir: where the main process writes ``detections_<iou type>.json``; None writes nothing.
        kpt_oks_sigmas: OKS sigmas when the dataset has keypoints (None: COCO's person sigmas).
        verbose: print the COCOeval tables.

    Returns:
        {"metrics": {iou_type: {stat: value}}, "num_images": images evaluated, "unreadable": ids skipped};
        with several categories "metrics" also holds "classes" (:func:`class_report`).
        Processes other than the main one get an empty "metrics".
    """
    if dataset.task == "keypoints" and kpt_oks_sigmas is None and len(dataset.keypoint_names) != 17:
        raise ValueError(
            f"keypoint AP needs one OKS sigma per keypoint: the set has {len(dataset.keypoint_names)} keypoints, "
            "COCO's default sigmas are for 17; set data.kpt_oks_sigmas"
        )
    device = next(model.parameters()).device
    if ctx is None:
        ctx = DistContext(0, 1, 0, device, True, "none")
    was_training = model.training
    model.eval()
    sampler = ResumableSampler(
        len(dataset), shuffle=False, rank=ctx.rank, world_size=ctx.world_size, pad=False
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate_detection
    )
    outputs, image_ids, unreadable = [], [], []
    for images, targets, skipped in loader:
        unreadable.extend(skipped)
        if not images:
            continue
        predictions = model([image.to(device) for image in images])
        outputs.extend({k: v.cpu() for k, v in p.items()} for p in predictions)
        image_ids.extend(t["image_id"] for t in targets)
    model.train(was_training)
    results = predictions_to_coco(outputs, image_ids, dataset.category_ids)
    results.setdefault("segm" if dataset.task == "instances" else "keypoints", [])  # scored even when empty
    gathered = all_gather_objects((results, image_ids, unreadable))
    if not ctx.is_main:
        return {"metrics": {}, "num_images": 0, "unreadable": []}
    merged: dict[str, list[dict[str, Any]]] = {k: [] for k in results}
    all_ids, all_unreadable = [], []
    for part, ids, bad in gathered:
        for key, entries in part.items():
            merged[key].extend(entries)
        all_ids.extend(ids)
        all_unreadable.extend(bad)
    if all_unreadable:
        warnings.warn(
            f"evaluation skipped {len(all_unreadable)} unreadable images: {all_unreadable}", stacklevel=2
        )
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for iou_type, entries in merged.items():
            (out / f"detections_{iou_type}.json").write_text(json.dumps(entries), encoding="utf-8")
    metrics = coco_evaluate(dataset.coco, merged, all_ids, kpt_oks_sigmas=kpt_oks_sigmas, verbose=verbose)
    if len(dataset.category_ids) > 1:
        metrics["classes"] = class_report(dataset.coco, merged["bbox"], all_ids)
    return {"metrics": metrics, "num_images": len(all_ids), "unreadable": sorted(all_unreadable)}
