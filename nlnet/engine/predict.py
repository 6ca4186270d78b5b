"""A trained model on the user's own videos: class names and probabilities, with the checkpoint's test protocol.

Each video is decoded and cut into views exactly as ``nlnet test`` does for its recipe (``data.test_clips`` x
``data.test_crops`` views, fully convolutional, through :func:`nlnet.engine.evaluate.video_scores`), or one
centre clip with a centre crop with ``single_view``. The class names come from ``names`` when given, else from
the recipe (``data.class_names``; a built-in set is resolved for them), else the 400 Kinetics names, which is
what an official model converted with ``nlnet convert caffe2`` predicts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from nlnet.data import VideoRecord, dataset_of_records, kinetics400_class_names
from nlnet.data.annotations import VIDEO_EXTENSIONS
from nlnet.engine.build import build_trained_network
from nlnet.engine.builtin import resolve_builtin
from nlnet.engine.checkpoint import load_checkpoint
from nlnet.engine.config import load_config, recipe_of_checkpoint
from nlnet.engine.distributed import cleanup_distributed, setup_distributed
from nlnet.engine.evaluate import video_scores
from nlnet.utils.io import atomic_write
from nlnet.weights.caffe2 import CONVERTED_FORMATS

__all__ = ["class_names_for", "predict", "video_files"]

KINETICS400 = "kinetics400"
# The "format" entry of a file written by nlnet.weights.caffe2.convert_caffe2.


def video_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The videos named by ``inputs``: each file as given, and every video file under each folder, sorted.

    A folder contributes the files (at any depth) whose suffix is in
    ``nlnet.data.annotations.VIDEO_EXTENSIONS``; a file named directly is taken whatever its suffix.

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: no input, or a folder without a video file.
    """
    if not inputs:
        raise ValueError("expected at least one video file or folder, got none")
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
            if not found:
                raise ValueError(f"{item} holds no video file (expected suffixes {', '.join(VIDEO_EXTENSIONS)})")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"no such video file or folder: {item}")
    return files


def _recipe(checkpoint: str | Path, config: str | Path | None) -> DictConfig:
    """``config`` if given; else a converted model's architecture (with the pixel mean/std its source framework
    used, when the file records them) and the Kinetics protocol of the schema defaults; else the recipe the
    checkpoint was trained with."""
    if config is not None:
        return load_config(config)
    state = load_checkpoint(checkpoint)
    if state.get("format") in CONVERTED_FORMATS:
        num_classes = int(state["num_classes"])
        data: dict[str, Any] = {"num_classes": num_classes}
        normalization = state.get("normalization")
        if isinstance(normalization, dict):
            data.update(mean=list(normalization["mean"]), std=list(normalization["std"]))
        model = {"name": state["arch"], "num_classes": num_classes, "overrides": state["overrides"]}
        return load_config({"model": model, "data": data})
    return load_config(recipe_of_checkpoint(checkpoint))


def class_names_for(cfg: DictConfig, names: str | Path | Sequence[str] | None = None) -> list[str]:
    """The class names in index order, checked against the recipe's class count.

    Args:
        cfg: the recipe.
        names: ``"kinetics400"``, a text file with one name a line, or the names themselves; None: the
            recipe's ``data.class_names`` (a built-in set resolved for them), else the Kinetics-400 names.

    Raises:
        FileNotFoundError: the names file does not exist.
        ValueError: the number of names differs from the recipe's ``model.num_classes``.
    """
    source: str
    if names is None:
        if cfg.data.class_names is None and cfg.data.format == "builtin":
            cfg = resolve_builtin(cfg)
        if cfg.data.class_names is not None:
            found, source = [str(n) for n in cfg.data.class_names], "the checkpoint's recipe"
        else:
            found, source = kinetics400_class_names(), "the Kinetics-400 names (the default)"
    elif isinstance(names, (str, Path)) and str(names) == KINETICS400:
        found, source = kinetics400_class_names(), "the Kinetics-400 names"
    elif isinstance(names, (str, Path)):
        path = Path(names)
        if not path.is_file():
            raise FileNotFoundError(f"class names file not found: {path} (expected one name a line, or kinetics400)")
        found = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        source = str(path)
    else:
        found, source = [str(n) for n in names], "the names given"
    num_classes = int(cfg.model.num_classes)
    if len(found) != num_classes:
        raise ValueError(
            f"the model has {num_classes} classes but {source} has {len(found)} names; pass --classes with a "
            f"file of {num_classes} names, one a line"
        )
    return found


def _ranked(scores: np.ndarray, names: Sequence[str], top_k: int) -> list[dict[str, Any]]:
    # Stable descending order, as nlnet.engine.evaluate.top_k_accuracy ranks: ties go to the lower index.
    order = np.argsort(-scores, kind="stable")[:top_k]
    return [{"class": names[i], "index": int(i), "probability": float(scores[i])} for i in order]


@torch.no_grad()
def predict(
    checkpoint: str | Path,
    videos: Sequence[str | Path],
    *,
    top_k: int = 5,
    classes: str | Path | Sequence[str] | None = None,
    single_view: bool = False,
    config: str | Path | None = None,
    output: str | Path | None = None,
    device: str | None = None,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Classifies videos with a checkpoint, under the test protocol of its recipe.

    Args:
        checkpoint: an nlnet training checkpoint (it carries its recipe), a state dict with its run's
            ``config.yaml`` beside it, or a model converted by ``nlnet convert caffe2``.
        videos: video files and folders (see :func:`video_files`).
        top_k: classes to list per video.
        classes: see :func:`class_names_for`'s ``names``.
        single_view: one centre clip, centre crop per video, instead of test_clips x test_crops views.
        config: a recipe to use instead of the checkpoint's (a converted model's default is the schema's
            Kinetics protocol: 32 frames at stride 2, 10 clips x 3 crops of 256).
        output: JSON file for the results (with every video's full score vector); None writes none.
        device: "cpu" or "cuda"; None picks CUDA when available. The forward pass runs under ``train.amp``.
        num_workers: decoding processes; None: the recipe's ``test.num_workers``.
        progress: a progress bar over the videos (on stderr).

    Returns:
        {"checkpoint", "views": {"clips", "crops"}, "multi_label", "class_names", "videos"}: one entry per video
        in input order, ``{"video", "top_k": [{"class", "index", "probability"}], "scores"}``, or
        ``{"video", "error"}`` for a video that could not be read.

    Raises:
        ValueError: ``top_k`` below 1, no video, class names that do not fit the model, or weights that do not
            fit the recipe's model; all before any video is decoded.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    files = video_files(videos)
    cfg = _recipe(checkpoint, config)
    names = class_names_for(cfg, classes)
    ctx = setup_distributed(device)
    try:
        model = build_trained_network(cfg.model, checkpoint)
        model.to(ctx.device).eval()
        entries = _score_videos(model, cfg, files, names, ctx.device, top_k, single_view, num_workers, progress)
    finally:
        cleanup_distributed()
    views = (1, 1) if single_view else (int(cfg.data.test_clips), int(cfg.data.test_crops))
    document = {
        "checkpoint": str(checkpoint),
        "views": {"clips": views[0], "crops": views[1]},
        "multi_label": bool(cfg.data.multi_label),
        "class_names": names,
        "videos": entries,
    }
    if output is not None:
        atomic_write(output, lambda handle: handle.write(json.dumps(document, indent=1).encode("utf-8")))
    return document


def _score_videos(
    model: torch.nn.Module,
    cfg: DictConfig,
    files: list[Path],
    names: list[str],
    device: torch.device,
    top_k: int,
    single_view: bool,
    num_workers: int | None,
    progress: bool,
) -> list[dict[str, Any]]:
    multi_label = bool(cfg.data.multi_label)
    # The videos carry no label; the multi-hot form of the dataset accepts an empty one. Softmax or sigmoid is
    # the recipe's multi_label, passed to video_scores.
    records = [VideoRecord(path, ()) for path in files]
    dataset = dataset_of_records(
        records, cfg.data, "center" if single_view else "test", multi_label=True, normalized=False
    )
    workers = int(cfg.test.num_workers) if num_workers is None else num_workers
    # batch_size=None: one video per item, uncollated, so an unreadable video is one entry with its error.
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=min(workers, len(files)))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[cfg.train.amp]
    entries = []
    for item in tqdm(loader, total=len(files), desc="predict", unit="video", disable=not progress):
        video = str(files[item["index"]])
        if "skipped" in item:
            entries.append({"video": video, "error": item["error"]})
            continue
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            scores = (
                video_scores(
                    model,
                    item["clip"].unsqueeze(0).to(device),
                    multi_label=multi_label,
                    view_chunk=int(cfg.test.view_chunk),
                    mean=dataset.mean,
                    std=dataset.std,
                )[0]
                .cpu()
                .numpy()
            )
        entries.append({"video": video, "top_k": _ranked(scores, names, top_k), "scores": scores.tolist()})
    return entries
