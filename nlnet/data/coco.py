"""COCO-format detection data for the §6 detectors, and a generated COCO-format set of simple shapes.

:class:`CocoDetection` reads an image folder plus an instances (or person-keypoints) JSON with pycocotools and
yields what torchvision's detectors take: a float image (3, H, W) in [0, 1] and a target dict. Resizing to
``min_size``/``max_size`` (and multi-scale training with a tuple of ``min_size``) is done by the detector's
own ``GeneralizedRCNNTransform``, so the only augmentation here is the horizontal flip, which also mirrors
masks and keypoints and swaps left/right keypoint pairs.

Bad input never stops a run: a missing image file, an unreadable one, an annotation whose box is empty after
clipping or whose polygons enclose no area is skipped with a warning and counted (``dataset.skipped``).

:func:`make_shapes_coco` writes the built-in set: squares, triangles and circles with instance polygons,
or, for keypoints, kites whose four corners (top, left, bottom, right) are marked and annotated.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from nlnet.utils.io import atomic_write

__all__ = [
    "CocoDetection",
    "collate_detection",
    "flip_map_from_names",
    "hflip_target",
    "make_shapes_coco",
]

TASKS = ("instances", "keypoints")


def flip_map_from_names(names: Sequence[str]) -> list[int]:
    """Index permutation that a horizontal flip applies to keypoints, found from their names.

    A name containing the word "left" is paired with the same name with "right" (and the other way round),
    e.g. COCO's ``left_eye`` <-> ``right_eye``; names without a mirrored partner map to themselves.

    Args:
        names: the category's ``keypoints`` list.

    Returns:
        ``flip[i]`` = index of the keypoint that keypoint ``i`` becomes after the flip.
    """
    index = {name: i for i, name in enumerate(names)}
    flip = []
    for i, name in enumerate(names):
        tokens = name.split("_")
        swapped = "_".join({"left": "right", "right": "left"}.get(token, token) for token in tokens)
        flip.append(index.get(swapped, i))
    if sorted(flip) != list(range(len(names))):
        raise ValueError(f"keypoint names {list(names)} give no one-to-one left/right pairing: {flip}")
    return flip


def hflip_target(target: dict[str, Any], width: int, flip_map: Sequence[int] | None = None) -> dict[str, Any]:
    """Mirror a detection target left-right in an image ``width`` pixels wide.

    Args:
        target: boxes (N, 4) xyxy in pixels; optional masks (N, H, W) and keypoints (N, K, 3) as (x, y, v).
        width: image width in pixels; pixel edges run 0..width, so x becomes width - x.
        flip_map: keypoint permutation (see :func:`flip_map_from_names`); required when keypoints are present.

    Returns:
        A new dict; other entries are shared with ``target``.
    """
    flipped = dict(target)
    boxes = target["boxes"]
    flipped["boxes"] = torch.stack(
        [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1
    )
    if "masks" in target:
        flipped["masks"] = target["masks"].flip(-1)
    if "keypoints" in target:
        if flip_map is None:
            raise ValueError("flipping keypoints needs a flip_map (left/right pairs), got None")
        keypoints = target["keypoints"][:, list(flip_map)].clone()
        visible = keypoints[..., 2] > 0
        # unlabelled keypoints stay at (0, 0, 0) as COCO writes them
        keypoints[..., 0] = torch.where(visible, width - keypoints[..., 0], keypoints[..., 0])
        flipped["keypoints"] = keypoints
    return flipped


@dataclass
class _Record:
    image_id: int
    path: Path
    height: int
    width: int
    boxes: list[list[float]]
    labels: list[int]
    areas: list[float]
    segmentations: list[Any]
    keypoints: list[list[float]]


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection set: an image folder and an instances or person-keypoints JSON.

    Args:
        image_dir: folder holding the ``file_name`` of every image entry.
        annotation_file: the COCO JSON.
        task: "instances" (boxes + masks, for Mask R-CNN) or "keypoints" (boxes + keypoints, for Keypoint
            R-CNN; only categories that declare ``keypoints`` are used).
        train: flip horizontally with probability ``flip_prob`` (torch's RNG, so worker seeds apply).
        flip_prob: probability of the flip in training.
        drop_empty: leave out images without a usable annotation (useful for training, never for evaluation).
        flip_map: keypoint permutation for the flip; derived from the keypoint names when None.

    Attributes:
        coco: the pycocotools ``COCO`` object (the evaluation ground truth).
        category_ids: COCO category id of each label: label ``i + 1`` is ``category_ids[i]``, 0 is background.
        keypoint_names: the keypoint names (keypoints task), else [].
        skipped: counts of what was skipped while indexing: ``missing_image``, ``degenerate_box``,
            ``degenerate_polygon``. Unreadable images are found while loading; see :func:`collate_detection`.
    """

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        *,
        task: str = "instances",
        train: bool = False,
        flip_prob: float = 0.5,
        drop_empty: bool = False,
        flip_map: Sequence[int] | None = None,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        annotation_file = Path(annotation_file)
        if not annotation_file.is_file():
            raise FileNotFoundError(f"annotation file not found: {annotation_file}")
        self.image_dir = Path(image_dir)
        self.task = task
        self.train = train
        self.flip_prob = flip_prob
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
            self.coco = COCO(str(annotation_file))

        categories = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        if task == "keypoints":
            categories = [c for c in categories if c.get("keypoints")]
            if not categories:
                raise ValueError(f"{annotation_file}: task='keypoints' but no category declares 'keypoints'")
            names = {tuple(c["keypoints"]) for c in categories}
            if len(names) != 1:
                raise ValueError(
                    f"{annotation_file}: keypoint categories disagree on keypoint names: {names}"
                )
            self.keypoint_names = list(categories[0]["keypoints"])
            self.flip_map = (
                list(flip_map) if flip_map is not None else flip_map_from_names(self.keypoint_names)
            )
            if sorted(self.flip_map) != list(range(len(self.keypoint_names))):
                raise ValueError(
                    f"flip_map must permute 0..{len(self.keypoint_names) - 1}, got {self.flip_map}"
                )
        else:
            self.keypoint_names = []
            self.flip_map = None
        if not categories:
            raise ValueError(f"{annotation_file}: no categories")
        self.category_ids = [c["id"] for c in categories]
        self.category_names = [c["name"] for c in categories]
        label_of = {cat_id: i + 1 for i, cat_id in enumerate(self.category_ids)}

        self.skipped: Counter[str] = Counter()
        examples: dict[str, list[str]] = {}
        self.records: list[_Record] = []
        for image_id in sorted(self.coco.getImgIds()):
            info = self.coco.imgs[image_id]
            path = self.image_dir / info["file_name"]
            if not path.is_file():
                self._skip("missing_image", str(path), examples)
                continue
            record = _Record(image_id, path, int(info["height"]), int(info["width"]), [], [], [], [], [])
            for ann in self.coco.imgToAnns.get(image_id, []):
                if ann.get("iscrowd", 0) or ann["category_id"] not in label_of:
                    continue
                self._add_annotation(record, ann, label_of[ann["category_id"]], examples)
            if drop_empty and not record.boxes:
                continue
            self.records.append(record)
        for kind, count in sorted(self.skipped.items()):
            warnings.warn(
                f"{annotation_file}: skipped {count} x {kind} (e.g. {', '.join(examples[kind][:3])})",
                stacklevel=2,
            )

    @property
    def num_classes(self) -> int:
        """Classes including background, as torchvision's ``num_classes`` counts them."""
        return len(self.category_ids) + 1

    @property
    def image_ids(self) -> list[int]:
        """COCO ids of the images this dataset yields, in index order."""
        return [r.image_id for r in self.records]

    def _skip(self, kind: str, what: str, examples: dict[str, list[str]]) -> None:
        self.skipped[kind] += 1
        examples.setdefault(kind, []).append(what)

    def _add_annotation(self, record: _Record, ann: Mapping[str, Any], label: int, examples: dict) -> None:
        where = f"annotation {ann.get('id')} of image {record.image_id}"
        bbox = ann.get("bbox")
        if not isinstance(bbox, Sequence) or len(bbox) != 4:
            self._skip("degenerate_box", where, examples)
            return
        x, y, w, h = (float(v) for v in bbox)
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2, y2 = min(x + w, float(record.width)), min(y + h, float(record.height))
        # torchvision rejects boxes without positive width and height, so they go here, not in the model
        if not (math.isfinite(x1 + y1 + x2 + y2) and x2 - x1 >= 1.0 and y2 - y1 >= 1.0):
            self._skip("degenerate_box", where, examples)
            return
        segmentation = ann.get("segmentation")
        if self.task == "instances":
            if isinstance(segmentation, list):
                segmentation = [p for p in segmentation if _polygon_area(p) > 0.0]
                if not segmentation:
                    self._skip("degenerate_polygon", where, examples)
                    return
            elif not isinstance(segmentation, dict):
                self._skip("degenerate_polygon", where, examples)
                return
            record.segmentations.append(segmentation)
        else:
            keypoints = ann.get("keypoints") or [0.0] * (3 * len(self.keypoint_names))
            if len(keypoints) != 3 * len(self.keypoint_names):
                self._skip("degenerate_keypoints", where, examples)
                return
            record.keypoints.append([float(v) for v in keypoints])
        record.boxes.append([x1, y1, x2, y2])
        record.labels.append(label)
        record.areas.append(float(ann.get("area", w * h)))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]] | tuple[None, int]:
        """One image and its target.

        Returns:
            ``(image, target)`` with image (3, H, W) float in [0, 1] and target holding boxes (N, 4) xyxy,
            labels (N,) int64, image_id, area (N,), iscrowd (N,), and masks (N, H, W) uint8 or keypoints
            (N, K, 3); or ``(None, image_id)`` when the file cannot be decoded (a warning says which).
        """
        record = self.records[index]
        try:
            with Image.open(record.path) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            warnings.warn(f"skipping unreadable image {record.path}: {err}", stacklevel=2)
            return None, record.image_id
        width, height = image.size
        if (width, height) != (record.width, record.height):
            warnings.warn(
                f"{record.path}: the file is {width}x{height}, the JSON says {record.width}x{record.height}; "
                "using the file's size",
                stacklevel=2,
            )
        count = len(record.boxes)
        target: dict[str, Any] = {
            "boxes": torch.tensor(record.boxes, dtype=torch.float32).reshape(count, 4),
            "labels": torch.tensor(record.labels, dtype=torch.int64),
            "image_id": record.image_id,
            "area": torch.tensor(record.areas, dtype=torch.float32),
            "iscrowd": torch.zeros(count, dtype=torch.int64),
        }
        if self.task == "instances":
            masks = [_decode_segmentation(s, height, width) for s in record.segmentations]
            target["masks"] = (
                torch.from_numpy(np.stack(masks))
                if masks
                else torch.zeros(0, height, width, dtype=torch.uint8)
            )
        else:
            target["keypoints"] = torch.tensor(record.keypoints, dtype=torch.float32).reshape(
                count, len(self.keypoint_names), 3
            )
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        pixels = pixels.float().div_(255.0)  # (3, H, W)
        if self.train and torch.rand(()) < self.flip_prob:
            pixels = pixels.flip(-1)
            target = hflip_target(target, width, self.flip_map)
        return pixels, target


def collate_detection(
    batch: Sequence[tuple[torch.Tensor | None, Any]],
) -> tuple[list[torch.Tensor], list[dict[str, Any]], list[int]]:
    """DataLoader ``collate_fn``: lists of images and targets, and the ids of images that could not be read.

    Returns:
        ``(images, targets, unreadable_image_ids)``; the caller counts the last (it crosses worker processes,
        which a counter on the dataset would not).
    """
    images, targets, unreadable = [], [], []
    for image, target in batch:
        if image is None:
            unreadable.append(int(target))
        else:
            images.append(image)
            targets.append(target)
    return images, targets, unreadable


def _polygon_area(polygon: Any) -> float:
    """Shoelace area of a flat [x0, y0, x1, y1, ...] polygon; 0 for anything that is not one."""
    if not isinstance(polygon, Sequence) or len(polygon) < 6 or len(polygon) % 2:
        return 0.0
    try:
        xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        return 0.0
    if not np.isfinite(xy).all():
        return 0.0
    x, y = xy[:, 0], xy[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def _decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 mask of a polygon list or an RLE (compressed or not)."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# The built-in set

_SHAPES = ("square", "triangle", "circle")
_KITE_KEYPOINTS = ["top", "left", "bottom", "right"]
_GENERATOR_VERSION = 1


def make_shapes_coco(
    root: str | Path,
    split: str,
    *,
    num_images: int,
    task: str = "instances",
    seed: int = 0,
    image_size: tuple[int, int] = (128, 160),
    max_objects: int = 4,
) -> tuple[Path, Path]:
    """Write (or reuse) a generated COCO-format set of simple shapes.

    Instances: squares (rotated), triangles and circles, 1..``max_objects`` per image, non-overlapping, each
    with a random colour on a noisy background, annotated with a polygon, box and area. Keypoints: kites
    (convex quadrilaterals) whose corners ``top, left, bottom, right`` are marked with dark dots and annotated
    as keypoints, among unannotated circles. The same arguments always give the same files; a folder written
    with other arguments is regenerated.

    Args:
        root: output folder; images go to ``root/<task>_<split>/``, the JSON to ``root/<task>_<split>.json``.
        split: a name such as "train" or "val" (use different seeds for different splits).
        num_images: how many images.
        task: "instances" or "keypoints".
        seed: random seed.
        image_size: (smallest, largest) side length in pixels; width and height are drawn independently.
        max_objects: most annotated objects per image.

    Returns:
        ``(image_dir, annotation_file)``.
    """
    params = generator_params(_GENERATOR_VERSION, split, num_images, task, seed, image_size, max_objects, 64)
    low, high = params["image_size"]
    root = Path(root)
    image_dir = root / f"{task}_{split}"
    annotation_file = root / f"{task}_{split}.json"
    if is_current(annotation_file, params):
        return image_dir, annotation_file
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    images, annotations = [], []
    for image_index in range(num_images):
        width, height = rng.randint(low, high), rng.randint(low, high)
        canvas = _draw_image(rng, task, width, height, max_objects, image_index + 1, annotations)
        file_name = f"{image_index:06d}.png"
        canvas.save(image_dir / file_name)
        images.append({"id": image_index + 1, "file_name": file_name, "width": width, "height": height})
    write_set(annotation_file, "nlnet built-in shapes", params, images, annotations, _categories(task))
    return image_dir, annotation_file


def generator_params(
    version: int,
    split: str,
    num_images: int,
    task: str,
    seed: int,
    image_size: tuple[int, int],
    max_objects: int,
    min_side: int,
) -> dict[str, Any]:
    """A built-in set's arguments, checked, as stored in its JSON's ``info.generator`` (see :func:`is_current`)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if num_images < 1 or max_objects < 1:
        raise ValueError(f"num_images and max_objects must be >= 1, got {num_images} and {max_objects}")
    low, high = image_size
    if not min_side <= low <= high:
        raise ValueError(f"image_size must be (low, high) with {min_side} <= low <= high, got {image_size}")
    return {
        "version": version,
        "split": split,
        "num_images": num_images,
        "task": task,
        "seed": seed,
        "image_size": [low, high],
        "max_objects": max_objects,
    }


def is_current(annotation_file: Path, params: dict[str, Any]) -> bool:
    """Whether ``annotation_file`` exists and was written with ``params`` (else the set is regenerated)."""
    if not annotation_file.is_file():
        return False
    try:
        return json.loads(annotation_file.read_text())["info"]["generator"] == params
    except (ValueError, KeyError, TypeError):
        return False


def write_set(
    annotation_file: Path,
    description: str,
    params: dict[str, Any],
    images: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    categories: list[dict[str, Any]],
) -> None:
    """Write a built-in set's COCO JSON atomically, its arguments under ``info.generator``."""
    dataset = {
        "info": {"description": description, "generator": params},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    atomic_write(annotation_file, lambda handle: handle.write(json.dumps(dataset).encode()))


KITE_CATEGORY = {
    "id": 1,
    "name": "kite",
    "supercategory": "shape",
    "keypoints": list(_KITE_KEYPOINTS),
    "skeleton": [[1, 2], [2, 3], [3, 4], [4, 1]],
}


def _categories(task: str) -> list[dict[str, Any]]:
    if task == "instances":
        return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(_SHAPES)]
    return [dict(KITE_CATEGORY)]


def _draw_image(
    rng: random.Random,
    task: str,
    width: int,
    height: int,
    max_objects: int,
    image_id: int,
    annotations: list[dict[str, Any]],
) -> Image.Image:
    """Draws one image of `make_shapes_coco` and appends its objects' annotations to ``annotations``."""
    canvas = _background(rng, width, height)
    draw = ImageDraw.Draw(canvas)
    placed: list[tuple[float, float, float]] = []
    for _ in range(rng.randint(1, max_objects)):
        spot = _free_spot(rng, width, height, placed)
        if spot is None:
            break
        cx, cy, radius = spot
        placed.append(spot)
        colour = tuple(rng.randint(40, 255) for _ in range(3))
        if task == "instances":
            shape = rng.choice(_SHAPES)
            polygon = _shape_polygon(rng, shape, cx, cy, radius)
            category_id, keypoints = _SHAPES.index(shape) + 1, None
        else:
            polygon = _kite_polygon(rng, cx, cy, radius)
            category_id, keypoints = 1, polygon
        draw.polygon(polygon, fill=colour)
        if keypoints is not None:
            for x, y in keypoints:
                draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=(20, 20, 20))
        annotations.append(_annotation(len(annotations) + 1, image_id, category_id, polygon, keypoints))
    if task == "keypoints":
        # distractors the detector must learn to ignore
        for _ in range(rng.randint(0, 2)):
            spot = _free_spot(rng, width, height, placed)
            if spot is not None:
                placed.append(spot)
                circle = _shape_polygon(rng, "circle", *spot)
                draw.polygon(circle, fill=tuple(rng.randint(40, 255) for _ in range(3)))
    return canvas

def _background(rng: random.Random, width: int, height: int) -> Image.Image:
    base = np.array([rng.randint(0, 90) for _ in range(3)], dtype=np.float32)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0.0, 12.0, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _free_spot(
    rng: random.Random, width: int, height: int, placed: list[tuple[float, float, float]]
) -> tuple[float, float, float] | None:
    """Centre and radius of a disc inside the image that overlaps no placed disc (None after 50 tries)."""
    for _ in range(50):
        radius = rng.uniform(12.0, min(width, height) / 4.5)
        cx = rng.uniform(radius + 2, width - radius - 2)
        cy = rng.uniform(radius + 2, height - radius - 2)
        if all(math.hypot(cx - x, cy - y) > radius + r + 3 for x, y, r in placed):
            return cx, cy, radius
    return None


def _shape_polygon(
    rng: random.Random, shape: str, cx: float, cy: float, radius: float
) -> list[tuple[float, float]]:
    sides = {"square": 4, "triangle": 3, "circle": 32}[shape]
    start = rng.uniform(0.0, 2 * math.pi)
    return [
        (
            cx + radius * math.cos(start + 2 * math.pi * k / sides),
            cy + radius * math.sin(start + 2 * math.pi * k / sides),
        )
        for k in range(sides)
    ]


def _kite_polygon(rng: random.Random, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    """Corners in the order top, left, bottom, right; each stays the extreme point in its direction."""
    top = (cx + rng.uniform(-0.3, 0.3) * radius, cy - rng.uniform(0.6, 1.0) * radius)
    left = (cx - rng.uniform(0.6, 1.0) * radius, cy + rng.uniform(-0.3, 0.3) * radius)
    bottom = (cx + rng.uniform(-0.3, 0.3) * radius, cy + rng.uniform(0.6, 1.0) * radius)
    right = (cx + rng.uniform(0.6, 1.0) * radius, cy + rng.uniform(-0.3, 0.3) * radius)
    return [top, left, bottom, right]


def _annotation(
    ann_id: int,
    image_id: int,
    category_id: int,
    polygon: list[tuple[float, float]],
    keypoints: list[tuple[float, float]] | None,
) -> dict[str, Any]:
    flat = [round(v, 2) for point in polygon for v in point]
    xs, ys = flat[0::2], flat[1::2]
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": [flat],
        "area": round(_polygon_area(flat), 2),
        "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
        "iscrowd": 0,
    }
    if keypoints is not None:
        ann["keypoints"] = [v for x, y in keypoints for v in (round(x, 2), round(y, 2), 2)]
        ann["num_keypoints"] = len(keypoints)
    return ann
