"""Detectors with and without non-local blocks on the built-in context set (``nlnet detect demo``).

`detect_demo` trains the context recipe (``detection/context_maskrcnn_r50`` or
``detection/context_keypointrcnn_r50``) with its blocks and without them, for each seed, through the real
engine (`nlnet.engine.detection.train`: checkpoints, COCOeval at the end), and prints one table of box and mask
AP (or box and keypoint AP) per seed with the mean and standard deviation over seeds.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nlnet.engine import detection
from nlnet.viz import load_input, load_model

__all__ = ["DEMO_RECIPES", "detect_demo", "detections_figure", "format_detect_demo"]

DEMO_RECIPES = {
    "instances": "detection/context_maskrcnn_r50",
    "keypoints": "detection/context_keypointrcnn_r50",
}
_SECOND_METRIC = {"instances": ("segm", "mask AP"), "keypoints": ("keypoints", "keypoint AP")}
_VARIANTS = {
    "instances": {"nl": ["model.nonlocal_backbone=true"], "base": ["model.nonlocal_backbone=false"]},
    "keypoints": {
        "nl": ["model.nonlocal_backbone=true", "model.nonlocal_head=true"],
        "base": ["model.nonlocal_backbone=false", "model.nonlocal_head=false"],
    },
}


def detect_demo(
    task: str = "instances",
    *,
    seeds: int = 3,
    out_dir: str | Path = "runs/detect_demo",
    overrides: Sequence[str] = (),
    device: str | None = None,
) -> dict[str, Any]:
    """Train and score the context recipe of ``task`` with and without non-local blocks for seeds 0..seeds-1.

    Each run continues from the checkpoints already in its folder (``<out_dir>/<task>/seed<s>_<nl|base>``), so a
    second call only re-scores. Both variants of a seed start from the same seed, so every weight they share
    starts equal and they see the same data order.

    Args:
        task: "instances" (Mask R-CNN R50-FPN, block in res4) or "keypoints" (Keypoint R-CNN R50-FPN, block in
            res4 and four in the keypoint head).
        seeds: how many seeds.
        out_dir: where the runs and ``<task>_results.md`` go.
        overrides: dotted ``key=value`` overrides for every run (e.g. ``train.max_iter=100``).
        device: "cpu" or "cuda"; None picks CUDA when available.

    Returns:
        {"task", "rows": [{"seed", "variant", "box_ap", "second_ap", "step_s", "checkpoint"}], "table"}; APs are
        COCO's AP@[.5:.95] in percent; "step_s" is the median seconds per training step from the run's log.
        Instance rows also hold "agnostic_ap" and "right_class" (percent, from
        `nlnet.engine.coco_eval.class_report`): the box AP with the classes merged, and how often the best box
        on an object names its class (chance: 1 in 3 here).
    """
    if task not in DEMO_RECIPES:
        raise ValueError(f"task must be one of {sorted(DEMO_RECIPES)}, got {task!r}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    out = Path(out_dir)
    second_key = _SECOND_METRIC[task][0]
    rows = []
    for seed in range(seeds):
        for variant, flags in _VARIANTS[task].items():
            run_dir = out / task / f"seed{seed}_{variant}"
            cfg = detection.load_config(
                DEMO_RECIPES[task], [*overrides, *flags, f"seed={seed}", f"output_dir={run_dir}"]
            )
            result = detection.train(cfg, resume=True, device=device)
            metrics = result["metrics"]
            row = {
                "seed": seed,
                "variant": variant,
                "box_ap": 100 * float(metrics["bbox"]["AP"]),
                "second_ap": 100 * float(metrics[second_key]["AP"]),
                "step_s": _step_seconds(run_dir),
                "checkpoint": result["checkpoint"],
            }
            if "classes" in metrics:  # several categories: is the class the problem?
                classes = metrics["classes"]
                row["agnostic_ap"] = 100 * float(classes["agnostic_AP"])
                row["right_class"] = 100 * float(classes["right_class"] or 0.0)
            rows.append(row)
    table = format_detect_demo(task, rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{task}_results.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return {"task": task, "rows": rows, "table": table}


def _step_seconds(run_dir: Path) -> float:
    """The median of the step times the run logged (``metrics.jsonl``), also when this call only re-scored it."""
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        return math.nan
    with open(log, encoding="utf-8") as lines:
        times = [event["step_s"] for event in map(json.loads, lines) if event.get("event") == "train"]
    return statistics.median(times) if times else math.nan


def _mean_std(values: Sequence[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {spread:.1f}"


def format_detect_demo(task: str, rows: Sequence[dict[str, Any]]) -> str:
    """The markdown table of :func:`detect_demo`: per seed, AP without and with the blocks and the gain.

    When every row has "agnostic_ap" and "right_class" (instances), four more columns show them for both.

    Args:
        task: "instances" or "keypoints" (names the second AP column).
        rows: :func:`detect_demo`'s rows, one "nl" and one "base" per seed.
    """
    label = _SECOND_METRIC[task][1]
    by_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_seed.setdefault(int(row["seed"]), {})[row["variant"]] = row
    with_classes = all("right_class" in row for row in rows)
    extra = " class-agnostic box AP | + NL | right class % | + NL |" if with_classes else ""
    lines = [
        f"| seed | box AP | box AP + NL | gain | {label} | {label} + NL | gain |{extra} s / step (base / NL) |",
        "|---|---|---|---|---|---|---|" + "---|" * (4 * with_classes) + "---|",
    ]
    keys = ["b", "bn", "bg", "s", "sn", "sg"] + (["a", "an", "r", "rn"] if with_classes else [])
    columns: dict[str, list[float]] = {k: [] for k in keys}
    for seed, pair in sorted(by_seed.items()):
        if set(pair) != {"nl", "base"}:
            raise ValueError(f"seed {seed} needs one 'nl' and one 'base' row, got {sorted(pair)}")
        base, nl = pair["base"], pair["nl"]
        values = {
            "b": base["box_ap"],
            "bn": nl["box_ap"],
            "bg": nl["box_ap"] - base["box_ap"],
            "s": base["second_ap"],
            "sn": nl["second_ap"],
            "sg": nl["second_ap"] - base["second_ap"],
        }
        if with_classes:
            values.update(
                a=base["agnostic_ap"], an=nl["agnostic_ap"], r=base["right_class"], rn=nl["right_class"]
            )
        for key, value in values.items():
            columns[key].append(value)
        cells = " | ".join(f"{values[k]:+.1f}" if k.endswith("g") else f"{values[k]:.1f}" for k in columns)
        lines.append(f"| {seed} | {cells} | {base['step_s']:.2f} / {nl['step_s']:.2f} |")
    summary = " | ".join(_mean_std(columns[k]) for k in columns)
    lines.append(f"| mean ± std | {summary} | |")
    return "\n".join(lines)


def detections_figure(
    checkpoints: dict[str, str | Path], image: str | Path, out: str | Path, *, min_score: float = 0.5
) -> dict[str, list[tuple[str, float]]]:
    """One panel per detection checkpoint: its boxes (score >= ``min_score``) and labels on ``image``.

    Args:
        checkpoints: panel title -> nlnet detection checkpoint (its recipe is read from it).
        image: an image file.
        out: the PNG to write.
        min_score: lowest score drawn.

    Returns:
        Per panel, the (category name, score) of every box drawn, highest score first.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    figure, axes = plt.subplots(1, len(checkpoints), figsize=(4 * len(checkpoints), 4), squeeze=False)
    drawn: dict[str, list[tuple[str, float]]] = {}
    for axis, (title, checkpoint) in zip(axes[0], checkpoints.items(), strict=True):
        model, recipe = load_model(checkpoint)
        _, val_set = detection.build_datasets(recipe.data)
        names = val_set.category_names
        pixels, _ = load_input(image, model, recipe)
        with torch.no_grad():
            found = model([pixels])[0]
        axis.imshow(pixels.permute(1, 2, 0).numpy())
        drawn[title] = []
        for box, label, score in zip(found["boxes"], found["labels"], found["scores"], strict=True):
            if float(score) < min_score:
                continue
            x1, y1, x2, y2 = (float(v) for v in box)
            name = names[int(label) - 1]
            drawn[title].append((name, float(score)))
            axis.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="yellow", linewidth=1.5))
            axis.text(x1, y1 - 2, f"{name} {float(score):.2f}", color="yellow", fontsize=8)
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return drawn
