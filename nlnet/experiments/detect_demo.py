"""Detectors with and without non-local blocks on the built-in context set (``nlnet detect demo``).

`detect_demo` trains the context recipe (``detection/context_maskrcnn_r50`` or
``detection/context_keypointrcnn_r50``) with its blocks and without them, for each seed, through the real
engine (`nlnet.engine.detection.train`: checkpoints, COCOeval at the end), and prints one table of box and mask
AP (or box and keypoint AP) per seed with the mean and standard deviation over seeds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nlnet.engine import detection

__all__ = ["DEMO_RECIPES", "detect_demo", "format_detect_demo"]

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
        {"task", "rows": [{"seed", "variant", "box_ap", "second_ap", "train_s", "checkpoint"}], "table"}; APs are
        COCO's AP@[.5:.95] in percent.
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
            start = time.perf_counter()
            result = detection.train(cfg, resume=True, device=device)
            metrics = result["metrics"]
            rows.append(
                {
                    "seed": seed,
                    "variant": variant,
                    "box_ap": 100 * float(metrics["bbox"]["AP"]),
                    "second_ap": 100 * float(metrics[second_key]["AP"]),
                    "train_s": time.perf_counter() - start,
                    "checkpoint": result["checkpoint"],
                }
            )
    table = format_detect_demo(task, rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{task}_results.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return {"task": task, "rows": rows, "table": table}


def _mean_std(values: Sequence[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {spread:.1f}"


def format_detect_demo(task: str, rows: Sequence[dict[str, Any]]) -> str:
    """The markdown table of :func:`detect_demo`: per seed, AP without and with the blocks and the gain.

    Args:
        task: "instances" or "keypoints" (names the second AP column).
        rows: :func:`detect_demo`'s rows, one "nl" and one "base" per seed.
    """
    label = _SECOND_METRIC[task][1]
    by_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_seed.setdefault(int(row["seed"]), {})[row["variant"]] = row
    lines = [
        f"| seed | box AP | box AP + NL | gain | {label} | {label} + NL | gain | train s (base / NL) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    columns: dict[str, list[float]] = {k: [] for k in ("b", "bn", "bg", "s", "sn", "sg")}
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
        for key, value in values.items():
            columns[key].append(value)
        cells = " | ".join(f"{values[k]:+.1f}" if k.endswith("g") else f"{values[k]:.1f}" for k in columns)
        lines.append(f"| {seed} | {cells} | {base['train_s']:.0f} / {nl['train_s']:.0f} |")
    summary = " | ".join(_mean_std(columns[k]) for k in columns)
    lines.append(f"| mean ± std | {summary} | |")
    return "\n".join(lines)
