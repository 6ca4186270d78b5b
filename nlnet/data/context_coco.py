"""A generated COCO-format detection set in which an object's label is decided far away from the object.

Every image has a *cue*: a saturated colour bar across its top ``CUE_ROWS`` rows. Below it, at least
``CUE_GAP`` pixels further down, lie 1..``max_objects`` grey shapes on a grey noisy background. Nothing about
an object or its surroundings depends on the cue:

- instances (Mask R-CNN): every object of the image belongs to the category named after the cue's colour
  (``red``, ``green``, ``blue``); the shape (square, triangle, circle), its grey level, size and place are
  drawn independently of it, so a crop around an object is equally likely under every label;
- keypoints (Keypoint R-CNN): kites with dark dots on their four corners, as in the shapes set, but which
  corner is which depends on the cue: under a red bar the keypoints ``top, left, bottom, right`` are the
  top, left, bottom and right corners; under a blue bar the kite reads upside down (``top`` is the bottom
  corner, ``left`` the right one, ...). A half turn commutes with a horizontal flip, so the flip augmentation
  stays valid (left and right swap names under either cue).

A detector that classifies an RoI from the RoI's own features has to guess (1/3 for instances, 1/2 per kite);
a non-local block at res4, where every position can read every other, can look the colour up.

Each image is drawn from its own streams, ``random.Random(f"{seed}/{index}/scene")`` for everything below the
bar and ``.../cue`` for the cue, so the same scene can be drawn under another cue (:func:`draw_context_image`)
and nothing but the bar changes: the local evidence cannot decide the label (tested).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from nlnet.data.coco import (
    _SHAPES,
    KITE_CATEGORY,
    TASKS,
    _annotation,
    _kite_polygon,
    _shape_polygon,
    generator_params,
    is_current,
    write_set,
)

__all__ = [
    "CUE_COLOURS",
    "CUE_GAP",
    "CUE_ROWS",
    "LAYOUTS",
    "SIDE_BAR",
    "SIDE_GAP",
    "cue_of_pixels",
    "draw_context_image",
    "make_context_coco",
]

CUE_ROWS = 12  # the top bar's thickness in rows
CUE_GAP = 40
# The side bar's thickness in columns: three of res4's 16-px cells, so that the block's average over the
# positions, before it has learnt where to look, carries the colour. With a 12-px bar, under one cell, a
# Kaiming-started block named 21-25 % of the classes at seed 1 (500 and 1000 steps); with 48 px, 100 %.
SIDE_BAR = 48
# Side layout: the objects start this far from the bar. ResNet-50's res5 sees 483 px, i.e. 241 px either side of
# a position; with the RPN's 3x3 convolution on P5 the baseline's widest reach is about 275 px.
SIDE_GAP = 340
# each layout's smallest image side (top) or strip (side) that leaves room for the objects
_MIN_SIDE = {"top": 112, "side": 64}
LAYOUTS = tuple(_MIN_SIDE)
# RGB of each cue; instances use all three (category i + 1 is CUE_NAMES[i]), keypoints the first and last
CUE_NAMES = ("red", "green", "blue")
CUE_COLOURS = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (50, 80, 230)}
KEYPOINT_CUES = {"red": 0, "blue": 2}  # cue -> quarter turns from geometric corner to keypoint name
_GENERATOR_VERSION = 4


def cue_of_pixels(image: np.ndarray) -> str:
    """The cue's colour name read back from an (H, W, 3) uint8 image of either layout.

    The bar is whichever edge strip (the top ``CUE_ROWS`` rows, the left or right ``CUE_ROWS`` columns, inside
    either layout's bar) is the most saturated; the cue is the colour nearest to its mean RGB.
    """
    strips = [image[:CUE_ROWS], image[:, :CUE_ROWS], image[:, -CUE_ROWS:]]
    means = [strip.reshape(-1, 3).astype(np.float64).mean(axis=0) for strip in strips]
    mean = max(means, key=lambda rgb: float(rgb.max() - rgb.min()))
    return min(CUE_NAMES, key=lambda name: float(np.sum((mean - np.array(CUE_COLOURS[name])) ** 2)))


def draw_context_image(
    scene_seed: str, cue: str, task: str, width: int, height: int, max_objects: int, layout: str = "top"
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """One image of the context set and its objects, drawn from ``scene_seed`` under the cue ``cue``.

    Args:
        scene_seed: seed of everything but the bar's colour (the objects, the background, the bar's side).
        cue: a key of :data:`CUE_COLOURS` (for keypoints, of :data:`KEYPOINT_CUES`).
        task: "instances" or "keypoints".
        width, height: image size in pixels.
        max_objects: most objects.
        layout: "top" (the bar across the top, the objects ``CUE_GAP`` px below it) or "side" (the bar down
            the left or right edge, ``SIDE_BAR`` px wide, the objects at least ``SIDE_GAP`` px away from it).

    Returns:
        ``(image, objects)``; each object is {"category_id", "polygon" [(x, y), ...], "keypoints" [(x, y)] in
        name order, or None}.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    allowed = KEYPOINT_CUES if task == "keypoints" else CUE_COLOURS
    if cue not in allowed:
        raise ValueError(f"cue must be one of {sorted(allowed)} for task {task!r}, got {cue!r}")
    _check_layout(layout)
    rng = random.Random(scene_seed)
    grey = rng.randint(10, 60)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0.0, 10.0, size=(height, width, 1))
    pixels = np.clip(grey + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)  # grey: no hue outside the bar
    if layout == "top":
        pixels[:CUE_ROWS] = CUE_COLOURS[cue]
        # (left, right, top, bottom) bounds of the objects' discs, and their largest radius
        region = (2.0, width - 2.0, float(CUE_ROWS + CUE_GAP), height - 2.0)
        largest = min(28.0, (height - CUE_ROWS - CUE_GAP) / 2.5)
    else:
        far = SIDE_BAR + SIDE_GAP
        if rng.random() < 0.5:
            pixels[:, :SIDE_BAR] = CUE_COLOURS[cue]
            region = (float(far), width - 2.0, 2.0, height - 2.0)
        else:
            pixels[:, width - SIDE_BAR :] = CUE_COLOURS[cue]
            region = (2.0, float(width - far), 2.0, height - 2.0)
        largest = min(28.0, (height - 4) / 2.5, (width - far - 2) / 2.5)
    canvas = Image.fromarray(pixels)
    draw = ImageDraw.Draw(canvas)
    placed: list[tuple[float, float, float]] = []
    objects = []
    for _ in range(rng.randint(1, max_objects)):
        spot = _free_spot(rng, region, largest, placed)
        if spot is None:
            break
        placed.append(spot)
        level = rng.randint(120, 255)
        if task == "instances":
            polygon = _shape_polygon(rng, rng.choice(_SHAPES), *spot)
            category_id, keypoints = CUE_NAMES.index(cue) + 1, None
        else:
            polygon = _kite_polygon(rng, *spot)  # corners top, left, bottom, right
            turn = KEYPOINT_CUES[cue]
            category_id, keypoints = 1, [polygon[(j + turn) % 4] for j in range(4)]
        draw.polygon(polygon, fill=(level, level, level))
        if keypoints is not None:
            for x, y in polygon:
                draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=(20, 20, 20))
        objects.append({"category_id": category_id, "polygon": polygon, "keypoints": keypoints})
    return canvas, objects


def make_context_coco(
    root: str | Path,
    split: str,
    *,
    num_images: int,
    task: str = "instances",
    seed: int = 0,
    image_size: tuple[int, int] = (128, 160),
    max_objects: int = 3,
    layout: str = "top",
) -> tuple[Path, Path]:
    """Write (or reuse) the context set: ``root/context_<layout>_<task>_<split>/`` and its ``.json``.

    Args:
        root: output folder.
        split: a name such as "train" or "val" (use different seeds for different splits).
        num_images: how many images.
        task: "instances" or "keypoints".
        seed: random seed.
        image_size: (smallest, largest) in pixels. "top": of the width and the height, drawn independently; the
            smallest must leave room below the bar and the gap (>= 112). "side": of the height and of the
            objects' strip, likewise (>= 64); the width is ``SIDE_BAR + SIDE_GAP`` more than the strip.
        max_objects: most annotated objects per image.
        layout: "top" or "side" (see :func:`draw_context_image`).

    Returns:
        ``(image_dir, annotation_file)``. The same arguments always give the same files.
    """
    _check_layout(layout)
    min_side = _MIN_SIDE[layout]
    params = generator_params(_GENERATOR_VERSION, split, num_images, task, seed, image_size, max_objects, min_side)
    params["layout"] = layout
    low, high = params["image_size"]
    root = Path(root)
    image_dir = root / f"context_{layout}_{task}_{split}"
    annotation_file = root / f"context_{layout}_{task}_{split}.json"
    if is_current(annotation_file, params):
        return image_dir, annotation_file
    image_dir.mkdir(parents=True, exist_ok=True)
    cues = sorted(KEYPOINT_CUES, key=CUE_NAMES.index) if task == "keypoints" else list(CUE_NAMES)
    images, annotations = [], []
    for index in range(num_images):
        size_rng = random.Random(f"{seed}/{index}/size")
        width, height = size_rng.randint(low, high), size_rng.randint(low, high)
        if layout == "side":
            width += SIDE_BAR + SIDE_GAP
        cue = random.Random(f"{seed}/{index}/cue").choice(cues)
        scene = f"{seed}/{index}/scene"
        canvas, objects = draw_context_image(scene, cue, task, width, height, max_objects, layout)
        file_name = f"{index:06d}.png"
        canvas.save(image_dir / file_name)
        images.append({"id": index + 1, "file_name": file_name, "width": width, "height": height, "cue": cue})
        for obj in objects:
            annotations.append(
                _annotation(len(annotations) + 1, index + 1, obj["category_id"], obj["polygon"], obj["keypoints"])
            )
    categories = (
        [dict(KITE_CATEGORY)]
        if task == "keypoints"
        else [{"id": i + 1, "name": name, "supercategory": "cue"} for i, name in enumerate(CUE_NAMES)]
    )
    write_set(annotation_file, "nlnet built-in context set", params, images, annotations, categories)
    return image_dir, annotation_file


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _free_spot(
    rng: random.Random,
    region: tuple[float, float, float, float],
    largest: float,
    placed: list[tuple[float, float, float]],
) -> tuple[float, float, float] | None:
    """Centre and radius of a disc inside ``region`` (left, right, top, bottom) that overlaps no placed disc.

    None after 50 tries. Radii of 12 to ``largest`` (at most 28) px, about the shapes set's: with radii of
    10-18 neither detector learnt to find the objects within the recipe's budget, so the class question was
    never reached.
    """
    left, right, top, bottom = region
    for _ in range(50):
        radius = rng.uniform(12.0, largest)
        cx = rng.uniform(left + radius, right - radius)
        cy = rng.uniform(top + radius, bottom - radius)
        if all(((cx - x) ** 2 + (cy - y) ** 2) ** 0.5 > radius + r + 3 for x, y, r in placed):
            return cx, cy, radius
    return None
