"""Training and COCO evaluation of the §6 detectors (torchvision Mask/Keypoint R-CNN with non-local blocks).

:func:`train` runs an iteration-based recipe: SGD (momentum 0.9, no weight decay on BN), a linear warm-up into
a step decay, atomic checkpoints that resume exactly where the run stopped, DistributedDataParallel under
``torchrun``. :func:`evaluate` runs a detector over a :class:`~nlnet.data.coco.CocoDetection` set, writes the
detections in COCO's results format and scores them with pycocotools' ``COCOeval`` (bbox, segm, keypoints).

Recipes are YAML files over :data:`DEFAULTS` (unknown keys are errors), with dotted ``key=value`` overrides.
The default recipe trains on the generated built-in shapes (``nlnet.data.coco.make_shapes_coco``).
"""

from __future__ import annotations

import bisect
import contextlib
import io
import json
import logging
import math
import random
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nlnet.data.coco import CocoDetection, collate_detection, make_shapes_coco
from nlnet.engine.build import build_model, read_detector_state_dict
from nlnet.engine.checkpoint import (
    DETECTION_CHECKPOINT_FORMAT,
    checkpoint_path,
    get_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from nlnet.engine.config import apply_overrides, read_recipe
from nlnet.engine.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    setup_distributed,
)
from nlnet.engine.optim import build_optimizer
from nlnet.engine.sampler import ResumableSampler
from nlnet.models import detection as detection_models

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMAT",
    "DEFAULTS",
    "STAT_NAMES",
    "WarmupStepSchedule",
    "build_datasets",
    "coco_evaluate",
    "evaluate",
    "evaluate_checkpoint",
    "load_config",
    "measure_cost",
    "predictions_to_coco",
    "train",
]

CHECKPOINT_FORMAT = DETECTION_CHECKPOINT_FORMAT

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    # Checkpoints, metrics.jsonl, config.yaml, detections_*.json and results.json go here.
    "output_dir": "runs/detection/shapes_maskrcnn_r50_nl",
    "model": {
        "name": "maskrcnn_r50_fpn",
        "nonlocal_backbone": True,
        # null: on for the keypoint model, off (not allowed) for Mask R-CNN.
        "nonlocal_head": None,
        "nonlocal_mode": "embedded_gaussian",
        "frozen_bn": False,
        "trainable_backbone_layers": None,
        # A torchvision detector state dict (e.g. COCO-trained maskrcnn_resnet50_fpn) to start from.
        "weights": None,
        # A torchvision ImageNet ResNet state dict for the backbone.
        "weights_backbone": None,
        # Leave tensors whose shape differs from the file (a 91-class predictor) at their init.
        "skip_mismatched": False,
        # Keyword arguments of torchvision's MaskRCNN / KeypointRCNN. These defaults size the detector for the
        # built-in shapes on a CPU (small images, fewer proposals and RoI samples); the COCO recipes set
        # torchvision's values explicitly.
        "overrides": {
            "min_size": 128,
            "max_size": 160,
            "rpn_pre_nms_top_n_train": 600,
            "rpn_post_nms_top_n_train": 300,
            "rpn_pre_nms_top_n_test": 300,
            "rpn_post_nms_top_n_test": 100,
            "rpn_batch_size_per_image": 128,
            "box_batch_size_per_image": 64,
            "box_detections_per_img": 20,
        },
    },
    "data": {
        # "shapes": the generated built-in set under data.root; "coco": the four paths below.
        "format": "shapes",
        "root": "~/.cache/nlnet/detection-shapes",
        # "instances" (boxes + masks) or "keypoints"; must suit the model.
        "task": "instances",
        "train_images": None,
        "train_annotations": None,
        "val_images": None,
        "val_annotations": None,
        "shapes_train_images": 200,
        "shapes_val_images": 50,
        "shapes_image_size": [128, 160],
        "flip_prob": 0.5,
        # OKS sigmas for keypoint AP; null means COCO's 17 person sigmas (only valid with 17 keypoints).
        "kpt_oks_sigmas": None,
    },
    "train": {
        # Global batch: images per step over all processes.
        "batch_size": 2,
        "max_iter": 250,
        # From scratch with trainable BN, 0.01 diverges within ten steps on the shapes set; 0.003 does not.
        "base_lr": 0.003,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        # lr rises linearly from base_lr * warmup_factor to base_lr over warmup_iters steps ...
        "warmup_iters": 50,
        "warmup_factor": 0.001,
        # ... and is multiplied by gamma at each of these iterations.
        "decay_steps": [180, 230],
        "gamma": 0.1,
        "checkpoint_period": 100,
        "keep_checkpoints": 2,
        "log_period": 10,
        "num_workers": 0,
        # Evaluate on the val set after training.
        "eval_at_end": True,
    },
    "test": {
        "batch_size": 2,
        "num_workers": 0,
    },
}

STAT_NAMES = {
    "bbox": ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"],
    "segm": ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"],
    "keypoints": ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"],
}
_MASK_THRESHOLD = 0.5


def load_config(path: str | Path | Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> DictConfig:
    """A detection recipe: :data:`DEFAULTS`, then the YAML file, then dotted ``key=value`` overrides.

    ``nlnet.engine.config.load_config`` holds the video recipe's schema, so detection keeps its own schema
    with the same rules (struct mode: a misspelt key is an error; ``model.overrides`` is open) and reads files
    the same way (``nlnet.engine.config.read_recipe``: shipped names such as ``detection/shapes_maskrcnn_r50``,
    ``_base_``).

    Args:
        path: a path or shipped recipe name, a mapping such as ``nlnet.engine.config.recipe_of_checkpoint``
            returns, or None for the defaults.
        overrides: dotted ``key=value`` strings.

    Raises:
        FileNotFoundError: no such recipe file or name.
        ValueError: an unknown key, a malformed override or an invalid value.
    """
    cfg = OmegaConf.create(DEFAULTS)
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_struct(cfg.model.overrides, False)
    source = "recipe of the checkpoint" if isinstance(path, Mapping) else path
    try:
        if path is not None:
            cfg = OmegaConf.merge(cfg, read_recipe(path))
        apply_overrides(cfg, overrides)
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ValueError(f"invalid detection configuration ({source}): {err}") from err
    _validate(cfg)
    return cfg


def _validate(cfg: DictConfig) -> None:
    detection_models.preset(cfg.model.name)
    kind = detection_models.preset(cfg.model.name).kind
    task = cfg.data.task
    if (kind, task) not in (("mask", "instances"), ("keypoint", "keypoints")):
        raise ValueError(
            f"model {cfg.model.name!r} needs data.task={'instances' if kind == 'mask' else 'keypoints'}"
        )
    if cfg.data.format not in ("shapes", "coco"):
        raise ValueError(f"data.format must be 'shapes' or 'coco', got {cfg.data.format!r}")
    if cfg.data.format == "coco":
        for key in ("train_images", "train_annotations", "val_images", "val_annotations"):
            if cfg.data[key] is None:
                raise ValueError(f"data.format='coco' needs data.{key}")
    train_cfg = cfg.train
    for key in ("batch_size", "max_iter", "checkpoint_period", "log_period"):
        if int(train_cfg[key]) < 1:
            raise ValueError(f"train.{key} must be >= 1, got {train_cfg[key]}")
    if int(train_cfg.warmup_iters) < 0 or not 0.0 < float(train_cfg.warmup_factor) <= 1.0:
        raise ValueError(
            f"train.warmup_iters must be >= 0 and warmup_factor in (0, 1], got {train_cfg.warmup_iters} and "
            f"{train_cfg.warmup_factor}"
        )
    steps = list(train_cfg.decay_steps)
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)) or any(s < 1 for s in steps):
        raise ValueError(f"train.decay_steps must be positive and increasing, got {steps}")
    if int(cfg.test.batch_size) < 1:
        raise ValueError(f"test.batch_size must be >= 1, got {cfg.test.batch_size}")


class WarmupStepSchedule:
    """lr multiplier: linear warm-up from ``warmup_factor`` to 1 over ``warmup_iters``, ``gamma`` per step.

    Plain numbers only, so that ``LambdaLR.state_dict()`` (which stores this object's ``__dict__``) stays
    loadable with ``weights_only=True``.

    Args:
        warmup_iters: length of the warm-up in iterations (0: none).
        warmup_factor: multiplier at iteration 0.
        decay_steps: iterations from which one more factor ``gamma`` applies.
        gamma: decay factor.
    """

    def __init__(
        self, warmup_iters: int, warmup_factor: float, decay_steps: Sequence[int], gamma: float
    ) -> None:
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)
        self.decay_steps = [int(s) for s in decay_steps]
        self.gamma = float(gamma)

    def __call__(self, iteration: int) -> float:
        factor = self.gamma ** bisect.bisect_right(self.decay_steps, iteration)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            factor *= self.warmup_factor * (1.0 - alpha) + alpha
        return factor


def build_datasets(data_cfg: DictConfig) -> tuple[CocoDetection, CocoDetection]:
    """(train, val) sets of a recipe; the built-in shapes are generated on first use."""
    task = data_cfg.task
    if data_cfg.format == "shapes":
        size = tuple(int(s) for s in data_cfg.shapes_image_size)
        root = Path(data_cfg.root).expanduser()
        train_dir, train_ann = make_shapes_coco(
            root, "train", num_images=int(data_cfg.shapes_train_images), task=task, seed=1, image_size=size
        )
        val_dir, val_ann = make_shapes_coco(
            root, "val", num_images=int(data_cfg.shapes_val_images), task=task, seed=2, image_size=size
        )
    else:
        train_dir, train_ann = data_cfg.train_images, data_cfg.train_annotations
        val_dir, val_ann = data_cfg.val_images, data_cfg.val_annotations
    train_set = CocoDetection(
        train_dir, train_ann, task=task, train=True, flip_prob=float(data_cfg.flip_prob), drop_empty=True
    )
    val_set = CocoDetection(val_dir, val_ann, task=task, train=False)
    if train_set.category_ids != val_set.category_ids:
        raise ValueError(
            f"train and val categories differ: {train_set.category_ids} vs {val_set.category_ids}"
        )
    return train_set, val_set


# ------------------------------------------------------------------------------------------------- evaluation


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
        if detections:
            with contextlib.redirect_stdout(io.StringIO()):
                coco_dt = coco_gt.loadRes(list(detections))
        else:
            # loadRes cannot take an empty list; an empty result set scores 0 wherever there is ground truth
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": coco_gt.dataset["images"],
                "categories": coco_gt.dataset["categories"],
            }
            coco_dt.dataset["annotations"] = []
            with contextlib.redirect_stdout(io.StringIO()):
                coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
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
        {"metrics": {iou_type: {stat: value}}, "num_images": images evaluated, "unreadable": ids skipped}.
        Processes other than the main one get an empty "metrics".
    """
    if dataset.task == "keypoints" and kpt_oks_sigmas is None and len(dataset.keypoint_names) != 17:
        raise ValueError(
            f"keypoint AP needs one OKS sigma per keypoint: the set has {len(dataset.keypoint_names)} "
            "keypoints, "
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
    if dataset.task == "instances":
        results.setdefault("segm", [])
    else:
        results.setdefault("keypoints", [])
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
    return {"metrics": metrics, "num_images": len(all_ids), "unreadable": sorted(all_unreadable)}


def _evaluate_recipe(
    model: nn.Module, val_set: CocoDetection, cfg: DictConfig, ctx: DistContext, out: Path
) -> dict[str, Any]:
    """`evaluate` with the recipe's test batch size, loader workers and keypoint OKS sigmas."""
    sigmas = cfg.data.kpt_oks_sigmas
    return evaluate(
        model,
        val_set,
        ctx=ctx,
        batch_size=int(cfg.test.batch_size),
        num_workers=int(cfg.test.num_workers),
        output_dir=out,
        kpt_oks_sigmas=None if sigmas is None else [float(s) for s in sigmas],
    )


def evaluate_checkpoint(
    cfg: DictConfig,
    checkpoint: str | Path,
    *,
    output_dir: str | Path | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on the recipe's val set: ``nlnet detect eval``.

    Args:
        cfg: the recipe (:func:`load_config`).
        checkpoint: an nlnet detection checkpoint or a bare torchvision detector state dict; non-local blocks
            it lacks (a baseline's checkpoint, a torchvision COCO detector) stay the identity.
        output_dir: where detections and results.json go (default ``cfg.output_dir``).
        device: "cpu" or "cuda"; None picks CUDA when available.

    Returns:
        What :func:`evaluate` returns.
    """
    ctx = setup_distributed(device)
    try:
        _, val_set = build_datasets(cfg.data)
        model_cfg = cfg.model.copy()
        model_cfg.weights = model_cfg.weights_backbone = None
        model = build_model(model_cfg, val_set)
        # strict but for non-local blocks, so a model trained without them can be scored with them (identity)
        report = detection_models.load_detector_state_dict(model, read_detector_state_dict(checkpoint))
        if report.missing_nonlocal:
            logger.info("%s has no non-local blocks; they stay the identity", checkpoint)
        model.to(ctx.device)
        out = Path(output_dir if output_dir is not None else cfg.output_dir)
        result = _evaluate_recipe(model, val_set, cfg, ctx, out)
        if ctx.is_main:
            record = {"checkpoint": str(checkpoint), **result}
            (out / "results.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
        return result
    finally:
        cleanup_distributed()


# --------------------------------------------------------------------------------------------------- training


def train(cfg: DictConfig, *, resume: bool | str | Path = False, device: str | None = None) -> dict[str, Any]:
    """Train the recipe ``cfg`` (and evaluate at the end); under ``torchrun`` every process calls this.

    Args:
        cfg: from :func:`load_config`.
        resume: False to start afresh (``output_dir`` must hold no checkpoint), True to continue from the
            latest checkpoint in ``output_dir`` (afresh if none), or a checkpoint path.
        device: "cpu" or "cuda"; None picks CUDA when available.

    Returns:
        {"iteration", "checkpoint" (final file), "losses" (last logged mean of each loss), "step_time_s"
        (median seconds per step), "metrics" (final evaluation, empty if off), "unreadable" (ids skipped)}.
    """
    ctx = setup_distributed(device)
    try:
        out = Path(cfg.output_dir)
        if resume is True:
            resume_from = latest_checkpoint(out)
        elif resume:
            resume_from = Path(resume)
            if not resume_from.is_file():
                raise FileNotFoundError(f"checkpoint to resume from not found: {resume_from}")
        else:
            resume_from = None
            if latest_checkpoint(out) is not None:
                raise FileExistsError(
                    f"{out} already holds checkpoints; pass --resume to continue or choose another output_dir"
                )
        return _train(cfg, ctx, resume_from)
    finally:
        cleanup_distributed()


def _train(cfg: DictConfig, ctx: DistContext, resume_from: Path | None) -> dict[str, Any]:
    train_cfg = cfg.train
    out = Path(cfg.output_dir)
    global_batch = int(train_cfg.batch_size)
    if global_batch % ctx.world_size:
        raise ValueError(
            f"train.batch_size ({global_batch}) must be divisible by the {ctx.world_size} processes"
        )
    batch_per_rank = global_batch // ctx.world_size
    if ctx.is_main:
        # the built-in set is generated by one process; the others wait and then read it
        train_set, val_set = build_datasets(cfg.data)
    barrier()
    if not ctx.is_main:
        train_set, val_set = build_datasets(cfg.data)
    iters_per_epoch = len(train_set) // global_batch
    if iters_per_epoch < 1:
        raise ValueError(
            f"the training set has {len(train_set)} usable images, fewer than one batch of {global_batch}"
        )

    seed = int(cfg.seed)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    model = build_model(cfg.model, train_set).to(ctx.device)
    wrapped: nn.Module = model
    if ctx.world_size > 1:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids)
    optimizer = build_optimizer(
        model,
        base_lr=float(train_cfg.base_lr),
        momentum=float(train_cfg.momentum),
        nesterov=False,
        weight_decay=float(train_cfg.weight_decay),
    )
    schedule = WarmupStepSchedule(
        int(train_cfg.warmup_iters),
        float(train_cfg.warmup_factor),
        list(train_cfg.decay_steps),
        float(train_cfg.gamma),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    sampler = ResumableSampler(
        len(train_set), shuffle=True, seed=seed, rank=ctx.rank, world_size=ctx.world_size
    )
    # Each DataLoader iterator draws its workers' base seed; from its own generator (saved in checkpoints)
    # that draw leaves the global RNG, which RoI sampling and flips use, as it is in the uninterrupted run.
    loader_generator = torch.Generator().manual_seed(seed + ctx.rank)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=batch_per_rank,
        sampler=sampler,
        num_workers=int(train_cfg.num_workers),
        collate_fn=collate_detection,
        drop_last=True,
        generator=loader_generator,
    )

    iteration = 0
    unreadable: set[int] = set()
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{resume_from}: not an nlnet detection checkpoint (format {state.get('format')!r})"
            )
        if int(state["global_batch"]) != global_batch:
            raise ValueError(
                f"{resume_from}: saved with global batch {state['global_batch']}, the config has "
                f"{global_batch}"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        iteration = int(state["iteration"])
        unreadable.update(int(i) for i in state["unreadable"])
        rng, loader_rng = state["rng"], state["loader_rng"]
        set_rng_state(rng[ctx.rank % len(rng)])
        loader_generator.set_state(loader_rng[ctx.rank % len(loader_rng)])
        logger.info("resumed from %s at iteration %d", resume_from, iteration)

    jsonl = None
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
        jsonl = open(out / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed below)

    def save() -> Path:
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "iteration": iteration,
            "global_batch": global_batch,
            "rng": all_gather_objects(get_rng_state()),
            "loader_rng": all_gather_objects(loader_generator.get_state()),
            "unreadable": sorted({i for part in all_gather_objects(sorted(unreadable)) for i in part}),
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        path = checkpoint_path(out, iteration)
        if ctx.is_main:
            save_checkpoint(path, state)
            keep = int(train_cfg.keep_checkpoints)
            if keep:
                for old in list_checkpoints(out)[:-keep]:
                    old.unlink(missing_ok=True)
        barrier()
        return path

    max_iter = int(train_cfg.max_iter)
    log_period = int(train_cfg.log_period)
    step_times: list[float] = []
    window: dict[str, list[float]] = {}
    last_losses: dict[str, float] = {}
    model.train()
    try:
        while iteration < max_iter:
            epoch, first = divmod(iteration, iters_per_epoch)
            sampler.set_epoch(epoch, start=first * batch_per_rank)
            batches = iter(loader)
            for _ in range(first, iters_per_epoch):
                if iteration >= max_iter:
                    break
                images, targets, skipped = next(batches)
                for image_id in skipped:
                    if image_id not in unreadable:
                        warnings.warn(f"training skips unreadable image id {image_id}", stacklevel=2)
                    unreadable.add(image_id)
                tick = time.perf_counter()
                lr = optimizer.param_groups[0]["lr"]
                images = [image.to(ctx.device) for image in images]
                targets = [
                    {k: v.to(ctx.device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
                    for t in targets
                ]
                # a batch left empty by unreadable images (on any process) skips the update on every process,
                # so that DDP's gradient all-reduce stays matched; the schedule still advances
                empty = torch.tensor(float(not images), device=ctx.device)
                if all_reduce_sum(empty).item() == 0:
                    losses = wrapped(images, targets)
                    loss = sum(losses.values())
                    if not torch.isfinite(loss):
                        values = {k: float(v) for k, v in losses.items()}
                        raise FloatingPointError(f"loss is not finite at iteration {iteration}: {values}")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    for key, value in losses.items():
                        window.setdefault(key, []).append(float(value.detach()))
                    window.setdefault("loss", []).append(float(loss.detach()))
                scheduler.step()
                iteration += 1
                step_times.append(time.perf_counter() - tick)
                if iteration % log_period == 0 or iteration == max_iter:
                    last_losses = {
                        k: all_reduce_mean(torch.tensor(sum(v) / len(v), device=ctx.device)).item()
                        for k, v in sorted(window.items())
                    }
                    window = {}
                    record = {
                        "event": "train",
                        "iter": iteration,
                        "lr": lr,
                        "step_s": float(np.median(step_times[-log_period:])),
                        **last_losses,
                    }
                    if jsonl is not None:
                        jsonl.write(json.dumps(record) + "\n")
                        jsonl.flush()
                        logger.info(
                            "iter %d lr %.2e loss %.4f", iteration, lr, last_losses.get("loss", math.nan)
                        )
                if iteration % int(train_cfg.checkpoint_period) == 0 or iteration == max_iter:
                    save()
            del batches
        final = checkpoint_path(out, iteration)
        if not final.is_file():
            save()
        metrics: dict[str, Any] = {}
        if train_cfg.eval_at_end:
            result = _evaluate_recipe(model, val_set, cfg, ctx, out)
            metrics = result["metrics"]
            if jsonl is not None:
                jsonl.write(json.dumps({"event": "val", "iter": iteration, **metrics}) + "\n")
                (out / "results.json").write_text(json.dumps({"checkpoint": str(final), **result}, indent=2))
    finally:
        if jsonl is not None:
            jsonl.close()
    if unreadable:
        warnings.warn(
            f"training skipped {len(unreadable)} unreadable images: {sorted(unreadable)}", stacklevel=2
        )
    return {
        "iteration": iteration,
        "checkpoint": str(final),
        "losses": last_losses,
        "step_time_s": float(np.median(step_times)) if step_times else math.nan,
        "metrics": metrics,
        "unreadable": sorted(unreadable),
    }


# ------------------------------------------------------------------------------------------------------- cost


def measure_cost(
    cfg: DictConfig,
    *,
    steps: int = 5,
    image_size: Sequence[int] | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """What the recipe's non-local blocks cost: FLOPs (``torch.utils.flop_counter``) and training-step time.

    Two detectors are built from the same seed, the recipe's and the same without non-local blocks. FLOPs are
    counted for an inference forward pass on the recipe's first training images and, with ``image_size``, on a
    random image of that size (e.g. 800 x 1216, the paper's COCO scale; the detector's ``min_size`` and
    ``max_size`` are raised to fit it). The blocks' own cost is the difference of the two backbones' FLOPs on
    the same input, which does not depend on how many detections the heads process. Step time alternates the
    two models step by
    step, so both see the same machine load; the first step of each is not counted.

    Args:
        cfg: the recipe (:func:`load_config`).
        steps: timed training steps per model (forward, backward, SGD step).
        image_size: optional (H, W) for a second FLOP count.
        device: "cpu" or "cuda"; None picks CUDA when available.

    Returns:
        {"inputs": {label: {"backbone_gflops": {...}, "detector_gflops": {...}, "nonlocal_gflops",
        "nonlocal_share"}}, "step_time_s": {"nonlocal": median, "baseline": median}, "step_time_ratio"}.
        ``nonlocal_share`` is the blocks' FLOPs over the whole baseline detector's.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_set, _ = build_datasets(cfg.data)
    baseline_cfg = cfg.model.copy()
    baseline_cfg.nonlocal_backbone = False
    baseline_cfg.nonlocal_head = False
    models = {}
    for name, model_cfg in (("nonlocal", cfg.model), ("baseline", baseline_cfg)):
        torch.manual_seed(int(cfg.seed))
        models[name] = build_model(model_cfg, train_set).to(dev)
    if not detection_models.nonlocal_blocks(models["nonlocal"]):
        raise ValueError(
            "the recipe's model has no non-local block to measure (model.nonlocal_backbone=false?)"
        )
    batch = [train_set[i] for i in range(min(int(cfg.train.batch_size), len(train_set)))]
    images = [image.to(dev) for image, _ in batch]
    targets = [{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for _, t in batch]

    inputs = {"recipe": images}
    if image_size is not None:
        height, width = (int(s) for s in image_size)
        inputs[f"{height}x{width}"] = [torch.rand(3, height, width, device=dev)]

    def gflops(fn) -> float:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            fn()
        return counter.get_total_flops() / 1e9

    report: dict[str, Any] = {"inputs": {}}
    for label, tensors in inputs.items():
        entry: dict[str, Any] = {"backbone_gflops": {}, "detector_gflops": {}}
        for name, model in models.items():
            model.eval()
            transform = model.transform
            saved = (transform.min_size, transform.max_size)
            if label != "recipe":
                # evaluate at the given size: the transform would otherwise rescale to the recipe's min_size
                transform.min_size, transform.max_size = (
                    (min(tensors[0].shape[-2:]),),
                    max(tensors[0].shape[-2:]),
                )
            image_list, _ = transform(tensors)
            entry["backbone_gflops"][name] = gflops(lambda m=model, x=image_list.tensors: m.backbone(x))
            entry["detector_gflops"][name] = gflops(lambda m=model, x=tensors: m(x))
            transform.min_size, transform.max_size = saved
        added = entry["backbone_gflops"]["nonlocal"] - entry["backbone_gflops"]["baseline"]
        if any(".keypoint_head." in n for n in detection_models.nonlocal_blocks(models["nonlocal"])):
            # head blocks run on every RoI, so their cost is only seen through the whole detector
            added = entry["detector_gflops"]["nonlocal"] - entry["detector_gflops"]["baseline"]
        entry["nonlocal_gflops"] = added
        entry["nonlocal_share"] = added / entry["detector_gflops"]["baseline"]
        report["inputs"][label] = entry

    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-5, momentum=0.9) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(steps + 1):
        for name, model in models.items():
            model.train()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            tick = time.perf_counter()
            losses = model(images, targets)
            optimizers[name].zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizers[name].step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if step > 0:
                times[name].append(time.perf_counter() - tick)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    report["step_time_s"] = medians
    report["step_time_ratio"] = medians["nonlocal"] / medians["baseline"]
    report["images_per_step"] = len(images)
    return report
