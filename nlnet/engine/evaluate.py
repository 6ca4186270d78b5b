"""Video-level evaluation: the official multi-view, fully-convolutional protocol and its metrics.

Each test video arrives as V views (10 clips x 3 crops of 256 x 256 in the official protocol, or a single
centre clip). Every view runs through ``model.forward_dense``, giving a (K, t, h, w) map of logits; softmax
(sigmoid for multi-label sets such as Charades) is applied at each location and averaged over t, h, w, and the
video's score is the mean over its views (the official code sums them, which ranks classes identically).
Single-label sets report top-1/top-5 accuracy, multi-label sets the mean over classes of average precision,
leaving out classes without a positive video (their AP is undefined).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from sklearn.metrics import average_precision_score
from torch import nn

from nlnet.data.transforms import normalize_clips
from nlnet.engine.build import build_trained_network
from nlnet.engine.builtin import resolve_builtin
from nlnet.engine.distributed import DistContext, all_gather_objects, cleanup_distributed, setup_distributed
from nlnet.engine.sampler import ResumableSampler
from nlnet.utils.io import atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "Predictions",
    "build_eval_loader",
    "mean_average_precision",
    "predict",
    "summarize",
    "test",
    "top_k_accuracy",
    "video_scores",
]


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of videos whose label is among the k highest scores.

    Args:
        scores: (N, K) class scores.
        labels: (N,) integer labels.
        ks: the k values; k larger than K counts every video as correct.

    Returns:
        {"top1": ..., "top5": ...}.
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"expected scores (N, K) and labels (N,), got {scores.shape} and {labels.shape}")
    if scores.shape[0] == 0:
        raise ValueError("no videos to score")
    # Stable descending order: among tied scores the lower class index ranks first.
    order = np.argsort(-scores, axis=1, kind="stable")
    rank = np.argmax(order == labels[:, None], axis=1)
    return {f"top{k}": float(np.mean(rank < k)) for k in ks}


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean over classes of (non-interpolated) average precision, for multi-label sets such as Charades.

    A class's AP is the mean, over its positive videos, of the precision among all videos scored at least as
    high as that positive. Classes with no positive video are left out of the mean (AP undefined).

    Args:
        scores: (N, K) class scores.
        targets: (N, K) 0/1 ground truth.

    Returns:
        (mAP over the classes with positives, per-class AP (K,) with NaN for the classes left out).
    """
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(
            f"expected scores and targets of the same shape (N, K), got {scores.shape}, {targets.shape}"
        )
    if not np.isin(targets, (0, 1)).all():
        raise ValueError("targets must be 0/1")
    per_class = np.full(scores.shape[1], np.nan)
    for k in range(scores.shape[1]):
        if targets[:, k].any():
            per_class[k] = average_precision_score(targets[:, k], scores[:, k])
    if np.isnan(per_class).all():
        raise ValueError("no class has a positive video; mAP is undefined")
    return float(np.nanmean(per_class)), per_class


def video_scores(
    model: nn.Module,
    clips: torch.Tensor,
    *,
    multi_label: bool,
    view_chunk: int | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
) -> torch.Tensor:
    """Video-level scores from all views, fully convolutionally.

    Args:
        model: network with ``forward_dense(x) -> (B, K, t, h, w)`` logits, in eval mode.
        clips: (B, V, 3, T, H, W) views of B videos, or (B, 3, T, H, W) for one view each; float clips, or
            uint8 pixels normalised here with ``mean`` and ``std`` one chunk at a time.
        multi_label: sigmoid instead of softmax per location.
        view_chunk: views per forward pass (None: all B * V at once). Eval-mode networks treat every view on
            its own, so the scores do not depend on it; only the peak memory does.
        mean: normalisation mean in pixel units, for uint8 clips.
        std: normalisation standard deviation in pixel units, for uint8 clips.

    Returns:
        (B, K) mean over views of the per-location probabilities averaged over t, h, w.
    """
    if clips.dim() == 5:
        clips = clips.unsqueeze(1)
    if clips.dim() != 6:
        raise ValueError(
            f"expected clips (B, V, 3, T, H, W) or (B, 3, T, H, W), got shape {tuple(clips.shape)}"
        )
    raw = clips.dtype == torch.uint8
    if raw and (mean is None or std is None):
        raise ValueError("uint8 clips need the normalisation mean and std (pixel units); got None")
    if view_chunk is not None and view_chunk < 1:
        raise ValueError(f"view_chunk must be >= 1 or None, got {view_chunk}")
    b, v = clips.shape[:2]
    views = clips.flatten(0, 1)
    step = views.shape[0] if view_chunk is None else view_chunk
    per_view = []
    for start in range(0, views.shape[0], step):
        chunk = views[start : start + step]
        if raw:
            chunk = normalize_clips(chunk, mean, std)
        logits = model.forward_dense(chunk).float()  # (chunk, K, t, h, w)
        probs = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)
        per_view.append(probs.mean(dim=(2, 3, 4)))
    return torch.cat(per_view).view(b, v, -1).mean(dim=1)


@dataclass
class Predictions:
    """Per-video results, ordered by dataset index.

    Attributes:
        indices: (N,) dataset indices of the videos scored.
        scores: (N, K) video scores.
        labels: (N,) integer labels or (N, K) multi-hot targets.
        skipped: names of videos that could not be read (not in the arrays).
    """

    indices: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    skipped: list[str] = field(default_factory=list)


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    ctx: DistContext,
    *,
    multi_label: bool,
    amp_dtype: torch.dtype | None = None,
    view_chunk: int | None = None,
) -> Predictions:
    """Scores every video of ``loader`` (this process's shard), then gathers all processes' results.

    The model is put in eval mode; callers that continue training must switch it back. uint8 clips are
    normalised on ``ctx.device`` with the ``mean`` and ``std`` of ``loader.dataset``; ``view_chunk`` is
    :func:`video_scores`'.
    """
    dataset = loader.dataset
    mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    model.eval()
    indices, scores, labels, skipped = [], [], [], []
    for batch in loader:
        skipped.extend(batch["skipped"])
        if batch["clip"] is None:
            continue
        to_device = getattr(dataset, "to_device", None)
        clips = to_device(batch, ctx.device) if to_device else batch["clip"].to(ctx.device, non_blocking=True)
        autocast = torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
        with autocast:
            scores.append(
                video_scores(
                    model, clips, multi_label=multi_label, view_chunk=view_chunk, mean=mean, std=std
                ).cpu().numpy()
            )
        indices.append(np.asarray(batch["index"]))
        labels.append(np.asarray(batch["label"]))
    local = (indices, scores, labels, skipped)
    parts = all_gather_objects(local)
    flat_indices = [a for p in parts for a in p[0]]
    if not flat_indices:
        raise ValueError(
            "no readable video to evaluate" + (f"; skipped: {', '.join(skipped)}" if skipped else "")
        )
    all_indices = np.concatenate(flat_indices)
    order = np.argsort(all_indices, kind="stable")
    return Predictions(
        indices=all_indices[order],
        scores=np.concatenate([a for p in parts for a in p[1]])[order],
        labels=np.concatenate([a for p in parts for a in p[2]])[order],
        skipped=sorted({name for p in parts for name in p[3]}),
    )


def summarize(predictions: Predictions, *, multi_label: bool) -> dict[str, float]:
    """The protocol's metrics: {"top1", "top5"} or {"mAP"}, plus "videos" (how many were scored)."""
    if multi_label:
        value, _ = mean_average_precision(predictions.scores, predictions.labels)
        metrics = {"mAP": value}
    else:
        metrics = top_k_accuracy(predictions.scores, predictions.labels, ks=(1, 5))
    metrics["videos"] = len(predictions.indices)
    return metrics


def build_eval_loader(
    cfg: DictConfig, split: str, ctx: DistContext, *, single_view: bool = False
) -> torch.utils.data.DataLoader:
    """Loader over ``split`` ("val" or "test"), sharded across processes, every video exactly once.

    Args:
        cfg: full config; ``cfg.data`` is passed to ``nlnet.data.build_dataset``.
        split: "val" or "test".
        ctx: the process's place in the job.
        single_view: one clip from the middle of each video, centre crop, instead of test_clips x
            test_crops views.
    """
    from nlnet.data import build_dataset, build_loader

    data_cfg = cfg.data
    if single_view:
        # The data pipeline's "center" clip mode is the validation mode; point it at this split's list.
        data_cfg = data_cfg.copy()
        data_cfg.val_list = data_cfg[f"{split}_list"]
        data_cfg.val_mode = "center"
        split = "val"
    # uint8 clips from the workers (or decoded frames, cut into views on the device with data.augment_on:
    # device), normalised on the device (see video_scores).
    dataset = build_dataset(data_cfg, split, normalized=False, augment_on=str(data_cfg.get("augment_on", "worker")))
    sampler = ResumableSampler(
        len(dataset), shuffle=False, rank=ctx.rank, world_size=ctx.world_size, pad=False
    )
    return build_loader(
        dataset,
        int(cfg.test.batch_size),
        shuffle=False,
        num_workers=int(cfg.test.num_workers),
        sampler=sampler,
        seed=int(cfg.seed),
        drop_last=False,
        pin_memory=ctx.device.type == "cuda",
        # Read once per evaluation: workers that persisted would hold their memory through all of training.
        persistent_workers=False,
    )


def _scored_videos(predictions: Predictions, dataset: Any) -> list[dict[str, Any]]:
    """One entry per scored video, in dataset order, for the results JSON."""
    return [
        {
            "index": int(index),
            "video": str(dataset.records[int(index)].path),
            "label": label.tolist(),
            "scores": [float(s) for s in scores],
        }
        for index, label, scores in zip(predictions.indices, predictions.labels, predictions.scores, strict=True)
    ]


def test(
    cfg: DictConfig | dict,
    checkpoint: str | Path,
    *,
    single_view: bool = False,
    split: str = "test",
    output: str | Path | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Evaluates a checkpoint on ``data.test_list`` with the official protocol and writes per-video scores.

    Args:
        cfg: the recipe the checkpoint was trained with (model and data keys are used); a partial config or
            dict is completed with the schema defaults.
        checkpoint: an nlnet training checkpoint or a plain model state dict.
        single_view: one clip from the middle of each video with a centre crop, instead of test_clips x
            test_crops views.
        split: "test" or "val".
        output: JSON file for the results; default ``<output_dir>/test_<checkpoint stem>[_1view].json``.
        device: "cpu" or "cuda" to force one. The forward pass runs under ``train.amp`` autocast.

    Returns:
        {"metrics": {...}, "skipped": [...], "output": path of the JSON}.
    """
    cfg = resolve_builtin(cfg)
    ctx = setup_distributed(device)
    try:
        model = build_trained_network(cfg.model, checkpoint)
        model.to(ctx.device)
        loader = build_eval_loader(cfg, split, ctx, single_view=single_view)
        multi_label = bool(cfg.data.multi_label)
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[cfg.train.amp]
        result = predict(
            model,
            loader,
            ctx,
            multi_label=multi_label,
            amp_dtype=amp_dtype,
            view_chunk=int(cfg.test.view_chunk),
        )
        metrics = summarize(result, multi_label=multi_label)
        views = (1, 1) if single_view else (int(cfg.data.test_clips), int(cfg.data.test_crops))
        if output is None:
            suffix = "_1view" if single_view else ""
            output = Path(cfg.output_dir) / f"test_{Path(checkpoint).stem}{suffix}.json"
        output = Path(output)
        if result.skipped:
            warnings.warn(
                f"{len(result.skipped)} unreadable videos were skipped in evaluation: "
                + ", ".join(result.skipped),
                stacklevel=2,
            )
        if ctx.is_main:
            document = {
                "checkpoint": str(checkpoint),
                "split": split,
                "views": {"clips": views[0], "crops": views[1]},
                "multi_label": multi_label,
                "metrics": metrics,
                "skipped": result.skipped,
                "videos": _scored_videos(result, loader.dataset),
            }
            atomic_write(output, lambda handle: handle.write(json.dumps(document, indent=1).encode("utf-8")))
        return {"metrics": metrics, "skipped": result.skipped, "output": str(output)}
    finally:
        cleanup_distributed()
