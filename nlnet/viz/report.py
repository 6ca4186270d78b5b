"""The built-in set's attention report: does the cue's query look at the object the label depends on?

``nlnet.data.builtin`` draws clips whose label is the shape of the object wearing a colour cue shown earlier.
The report asks two questions of a query on the cue, over the test clips, and draws one clip:

- which object does it attend to? The attention weights of the key cells over each object are summed, and on
  clips with several objects the report counts how often the object of the cue's colour gets the most (a
  query that ignored colour would pick it 1 time in k);
- is its single strongest key on that object? A stricter reading: the strongest key is often a cue cell (the
  query's own colour, which carries nothing new) or a cell the object only half covers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from nlnet.viz.attention import AttentionMap, attention_map
from nlnet.viz.drawing import save_attention
from nlnet.viz.files import load_input, load_model

__all__ = ["BuiltinAttentionReport", "builtin_attention_figure"]



@dataclass(frozen=True)
class BuiltinAttentionReport:
    """How often a cue query's strongest key lies on the object whose shape is the label.

    Attributes:
        block: the block measured.
        clips: test clips examined.
        on_target: fraction of them whose top key (for a query at the cue) covers the matching object, in an
            object frame.
        chance: the same fraction for a key drawn uniformly from the key grid (the mean share of keys that
            cover the matching object).
        accuracy: the model's top-1 accuracy on those clips (one centre view).
        multi_object_clips: clips with more than one object (where the cue must pick one among others).
        on_target_multi: ``on_target`` over those clips (NaN without any).
        chance_multi: ``chance`` over those clips.
        object_choice: over those clips, the fraction in which the object of the cue's colour gets more of the
            query's attention (summed over the key cells that cover it) than any other object (NaN without any).
        object_chance: the same for an object picked at random: the mean of 1 / objects over those clips.
        figure_index: the test clip drawn: among the clips classified correctly with the top key on target,
            the first with the most objects (else the first clip).
        figure_objects: objects in that clip.
    """

    block: str
    clips: int
    on_target: float
    chance: float
    accuracy: float
    multi_object_clips: int
    on_target_multi: float
    chance_multi: float
    object_choice: float
    object_chance: float
    figure_index: int
    figure_objects: int


def builtin_attention_figure(
    checkpoint: str | Path,
    out: str | Path,
    *,
    block: str | None = None,
    max_clips: int = 200,
    style: str = "arrows",
    top_k: int = 3,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> BuiltinAttentionReport:
    """The paper's figure for a model trained on the built-in set, and how often it holds.

    For each test clip (up to ``max_clips``), the query is the centre of the colour cue in the middle frame of
    the cue phase; the label is the shape of the object that wears the cue's colour, shown only in the object
    phase. The clip drawn is one the model classifies correctly and whose strongest key covers that object,
    with the most distractor objects; the report says how often the top key is on target, overall and on the
    clips with several objects, and how often a uniformly random key would be.

    Args:
        checkpoint: a checkpoint trained on the built-in set; its recipe's ``data.root`` is the folder that
            ``nlnet.data.builtin.write_builtin`` made (with the drawn scenes of every clip).
        out: ``.png`` or ``.gif``.
        block: block name; None for the model's last block.
        max_clips: test clips examined.
        style: figure style (see :func:`plot_attention`).
        top_k: keys marked.
        config, overrides: see :func:`load_model`.

    Returns:
        A :class:`BuiltinAttentionReport`.
    """
    from nlnet.data import build_dataset
    from nlnet.data.builtin import BuiltinConfig, load_scenes

    if max_clips < 1:
        raise ValueError(f"max_clips must be >= 1, got {max_clips}")
    model, recipe = load_model(checkpoint, config=config, overrides=overrides)
    folder = Path(str(recipe.data.root))
    if not (folder / "scenes_test.jsonl").is_file():
        raise ValueError(f"data.root={folder} is not a built-in set folder (no scenes_test.jsonl in it)")
    generator = BuiltinConfig(**json.loads((folder / "settings.json").read_text())["config"])
    records = build_dataset(recipe.data, "test").records[:max_clips]
    scenes = load_scenes(folder, "test")[: len(records)]
    name = block
    hits, chance, correct, objects, choices = [], [], [], [], []
    best, first = None, None
    to_shown = _builtin_to_shown(generator.size, int(recipe.data.test_scale), int(recipe.data.test_crop))
    for index, (record, scene) in enumerate(zip(records, scenes, strict=True)):
        clip = _examine_clip(model, recipe, record, scene, generator.cue_frames, name, to_shown)
        name = clip.amap.block
        hits.append(clip.on_target)
        chance.append(clip.chance)
        correct.append(clip.correct)
        objects.append(len(scene.objects))
        choices.append(clip.object_choice)
        if first is None:
            first = (index, clip.amap, clip.frames)
        # The clip drawn: right and on target, with as many distractor objects as any such clip has.
        if hits[-1] and correct[-1] and (best is None or objects[-1] > objects[best[0]]):
            best = (index, clip.amap, clip.frames)
    figure_index, amap, frames = best if best is not None else first
    save_attention(amap, frames, out, style=style, top_k=top_k)
    multi = [i for i, count in enumerate(objects) if count > 1]
    return BuiltinAttentionReport(
        block=name,
        clips=len(records),
        on_target=float(np.mean(hits)),
        chance=float(np.mean(chance)),
        accuracy=float(np.mean(correct)),
        multi_object_clips=len(multi),
        on_target_multi=float(np.mean([hits[i] for i in multi])) if multi else float("nan"),
        chance_multi=float(np.mean([chance[i] for i in multi])) if multi else float("nan"),
        object_choice=float(np.mean([choices[i] for i in multi])) if multi else float("nan"),
        object_chance=float(np.mean([1 / objects[i] for i in multi])) if multi else float("nan"),
        figure_index=figure_index,
        figure_objects=objects[figure_index],
    )


@dataclass(frozen=True)
class _ClipResult:
    """One test clip seen from its cue: the map drawn, and whether the top key and the class are right."""

    amap: AttentionMap
    frames: np.ndarray
    on_target: bool
    chance: float
    correct: bool
    object_choice: bool  # the target gets more attention than any other object (True with one object)


def _examine_clip(
    model: nn.Module, recipe: DictConfig, record, scene, cue_frames: int, block: str | None, to_shown
) -> _ClipResult:
    """The cue query's attention map on one test clip, whether its top key covers the target, the prediction."""
    inputs, frames = load_input(record.path, model, recipe)
    crop = int(recipe.data.test_crop)
    cue_frame = cue_frames // 2
    cue = [c + v * cue_frame for c, v in zip(scene.cue_centre, scene.cue_velocity, strict=True)]
    query = (cue_frame, *(min(max(round(to_shown(c)), 0), crop - 1) for c in cue))
    amap = attention_map(model, inputs, query, block)
    target = next(obj for obj in scene.objects if obj.colour == scene.cue_colour)
    covers = _covers_object(amap, target, cue_frames, to_shown)
    with torch.no_grad():
        predicted = int(model(inputs[None].to(next(model.parameters()).device)).argmax())
    return _ClipResult(
        amap=amap,
        frames=frames,
        on_target=bool(covers.ravel()[int(amap.weights.argmax())]),
        chance=float(covers.mean()),
        correct=predicted == record.labels[0],
        object_choice=_attends_most_to(amap, scene.objects, target, cue_frames, to_shown),
    )


def _attends_most_to(amap: AttentionMap, objects, target, cue_frames: int, to_shown) -> bool:
    """Whether ``target`` gets more attention than every other object: the weights of the cells covering each."""
    mass = [float(amap.weights[_covers_object(amap, obj, cue_frames, to_shown)].sum()) for obj in objects]
    chosen = objects.index(target)
    return all(mass[chosen] > other for i, other in enumerate(mass) if i != chosen)


def _builtin_to_shown(size: int, test_scale: int, test_crop: int):
    """Maps a generator pixel coordinate to the test crop: resize by test_scale / size, centre crop."""
    factor = test_scale / size
    offset = (test_scale - test_crop) // 2
    return lambda c: (c + 0.5) * factor - 0.5 - offset


def _covers_object(amap: AttentionMap, target, cue_frames: int, to_shown) -> np.ndarray:
    """(T', H', W') bool: key cells that hold the target's centre in one of their object-phase frames."""
    covers = np.zeros(amap.weights.shape, dtype=bool)
    half_t, half_y, half_x = (s / 2 for s in amap.key_span)
    for index in np.ndindex(amap.weights.shape):
        t, y, x = amap.key_centers[index]
        first, last = math.ceil(t - half_t), math.floor(t + half_t)
        for frame in range(max(first, cue_frames), min(last, amap.frame_size[0] - 1) + 1):
            step = frame - cue_frames
            ty = to_shown(target.centre[0] + target.velocity[0] * step)
            tx = to_shown(target.centre[1] + target.velocity[1] * step)
            if abs(ty - y) <= half_y and abs(tx - x) <= half_x:
                covers[index] = True
                break
    return covers
