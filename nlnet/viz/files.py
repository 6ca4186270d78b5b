"""From files to figures: a checkpoint (or a recipe) and a video or an image to an attention figure.

The model and its recipe come through the engine: the checkpoint and recipe loaders
(``nlnet.engine.checkpoint``, ``nlnet.engine.config``, ``nlnet.engine.detection``) and the one recipe -> model
builder, ``nlnet.engine.build``. Inputs are read as at test time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from nlnet.engine.build import build_network, load_state_dict_exactly, state_dict_sizes
from nlnet.engine.builtin import resolve_builtin
from nlnet.engine.checkpoint import DETECTION_CHECKPOINT_FORMAT, latest_checkpoint, load_checkpoint
from nlnet.engine.config import apply_overrides, recipe_of_checkpoint
from nlnet.engine.config import load_config as load_video_config
from nlnet.models import available
from nlnet.viz.attention import AttentionMap, attention_map, is_detector, query_dependence
from nlnet.viz.drawing import save_attention

__all__ = ["IMAGE_SUFFIXES", "load_input", "load_model", "measure_query_dependence", "save_attention_figure"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def load_model(
    checkpoint: str | Path | None = None,
    *,
    config: str | Path | None = None,
    model_name: str | None = None,
    overrides: Sequence[str] = (),
) -> tuple[nn.Module, DictConfig]:
    """A trained (or untrained) model and the recipe that says how to feed it, in eval mode on the CPU.

    The recipe is the ``config`` YAML if given, else the recipe stored in the checkpoint, else the defaults;
    then ``overrides`` and ``model_name`` (as ``model.name``) are applied to it. Video models use
    ``nlnet.engine.config``; a detection checkpoint (or a detector's ``model_name``) uses
    ``nlnet.engine.detection``'s recipe.

    Args:
        checkpoint: an nlnet training or detection checkpoint, or a converted official model; a training
            output folder for its latest checkpoint; None for an untrained model (then ``config`` or
            ``model_name`` names it).
        config: YAML recipe (path or shipped name); needed for a checkpoint without one (a converted official
            model). Default: the recipe of the checkpoint (``nlnet.engine.config.recipe_of_checkpoint``).
        model_name: overrides ``model.name``.
        overrides: dotted ``key=value`` strings, e.g. ``["data.num_frames=8"]``.

    Returns:
        ``(model, recipe)``; every tensor of the model comes from the checkpoint when one is given.

    Raises:
        ValueError: the checkpoint does not fit the model, or nothing says which model to build.
    """
    named = model_name is not None or any(item.startswith("model.name=") for item in overrides)
    if checkpoint is None and config is None and not named:
        raise ValueError("give a checkpoint, a config or a model name: nothing says which model to show")
    if checkpoint is not None and Path(checkpoint).is_dir():
        folder, checkpoint = checkpoint, latest_checkpoint(checkpoint)
        if checkpoint is None:
            raise FileNotFoundError(f"no checkpoint_<iteration>.pt in {folder}")
    state = load_checkpoint(checkpoint) if checkpoint is not None else {}
    detector = state.get("format") == DETECTION_CHECKPOINT_FORMAT or (
        model_name is not None and model_name in available("detection")
    )
    names = list(overrides) + ([f"model.name={model_name}"] if model_name is not None else [])
    recipe = _load_recipe(checkpoint, config, names, detector)
    weights = state.get("model", state) if state else None
    with torch.random.fork_rng():
        # An untrained model is drawn from the recipe's seed, so its figures can be made again.
        torch.manual_seed(int(recipe.seed))
        sizes = state_dict_sizes(recipe.model, weights) if weights is not None else {}
        model = build_network(recipe.model, **sizes)
    if weights is not None:
        # Every tensor from the checkpoint: a figure of a half-loaded model would mislead.
        load_state_dict_exactly(model, weights, checkpoint)
    model.eval()
    return model, recipe


def _load_recipe(
    checkpoint: str | Path | None, config: str | Path | None, names: list[str], detector: bool
) -> DictConfig:
    """``config``'s recipe (else the checkpoint's, else the defaults) with the overrides ``names``."""
    if detector:
        # Only a detector's recipe needs the detection engine (and pycocotools with it).
        from nlnet.engine.detection import load_config
    else:
        load_config = load_video_config
    stored = None
    if checkpoint is not None and config is None:
        try:
            stored = recipe_of_checkpoint(checkpoint)
        except FileNotFoundError:
            stored = None  # a converted official model: the defaults and the model name say what it is
    recipe = load_config(config if stored is None else stored, [])
    apply_overrides(recipe, names)
    if not detector and recipe.data.format == "builtin":
        recipe = resolve_builtin(recipe)  # the generated set's folder and lists, as training and testing see them
    return recipe


def load_input(
    path: str | Path,
    model: nn.Module,
    recipe: DictConfig,
    *,
    clip_index: int = 0,
    num_clips: int = 1,
) -> tuple[torch.Tensor, np.ndarray]:
    """Reads what the model takes, as at test time, and the frames it shows.

    Videos: clip ``clip_index`` of ``num_clips`` spread over the video (the test protocol's temporal
    sampling: ``data.num_frames`` frames ``data.sampling_rate`` apart), shorter side to ``data.test_scale``,
    centre crop ``data.test_crop``, normalised with ``data.mean`` / ``data.std``. Images (for detectors): RGB
    scaled to [0, 1]; the detector resizes and normalises them itself.

    Returns:
        ``(inputs, frames)``: the model input — (3, T, S, S) for video models, (3, H, W) for detectors — and
        the uint8 (T, H, W, 3) frames it depicts (T = 1 for an image).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    if is_detector(model):
        from PIL import Image

        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"a detector takes an image ({', '.join(IMAGE_SUFFIXES)}), got {path}")
        with Image.open(path) as image:
            pixels = np.array(image.convert("RGB"))
        return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255, pixels[None]
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise ValueError(f"{path} is an image; video models take videos (give a detection checkpoint for images)")

    from nlnet.data.transforms import EvalViews
    from nlnet.data.video import decode_frames, eval_clip_indices

    data = recipe.data
    num_frames, rate = int(data.num_frames), int(data.sampling_rate)
    frames, _ = decode_frames(path, lambda n: eval_clip_indices(n, num_frames, rate, clip_index, num_clips))
    mean, std = _per_channel(data.mean), _per_channel(data.std)
    clip = EvalViews(int(data.test_scale), int(data.test_crop), 1, mean=mean, std=std)(torch.from_numpy(frames))[0]
    # The frames drawn are the network's input itself, un-normalised: what it saw, crop and all.
    shown = clip.permute(1, 2, 3, 0) * torch.tensor(std) + torch.tensor(mean)
    return clip, shown.round().clamp(0, 255).to(torch.uint8).numpy()


def _per_channel(value) -> list[float]:
    values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    return values * 3 if len(values) == 1 else values


def save_attention_figure(
    checkpoint: str | Path | None,
    source: str | Path | None,
    out: str | Path,
    *,
    config: str | Path | None = None,
    model_name: str | None = None,
    overrides: Sequence[str] = (),
    query: Sequence[float] | None = None,
    auto: str = "motion",
    block: str | None = None,
    style: str = "heatmap",
    top_k: int = 5,
    clip_index: int = 0,
    num_clips: int = 1,
    **save_options,
) -> AttentionMap:
    """``nlnet visualize``: a checkpoint and a video (or an image for a detector) to a PNG or GIF.

    Args:
        checkpoint: see :func:`load_model` (None: an untrained model named by ``config`` / ``model_name``).
        source: a video file, or an image for a detector; None takes the first video of the recipe's test
            split (``data.test_list``), e.g. of the built-in set a checkpoint was trained on.
        out: ``.png`` or ``.gif`` to write.
        config, model_name, overrides: see :func:`load_model`.
        query: (t, y, x) on the displayed frames (the test crop); None picks one (``auto``).
        auto: ``"motion"`` or ``"attended"`` (see :func:`auto_query`).
        block: block name; None for the model's last block.
        style: ``"heatmap"`` or ``"arrows"`` (PNG only).
        top_k: keys marked.
        clip_index, num_clips: which test clip of the video (see :func:`load_input`).
        **save_options: further keyword arguments of :func:`save_attention`.

    Returns:
        The :class:`AttentionMap` drawn.
    """
    model, recipe = load_model(checkpoint, config=config, model_name=model_name, overrides=overrides)
    source = _source_or_first_test_video(source, model, recipe)
    inputs, frames = load_input(source, model, recipe, clip_index=clip_index, num_clips=num_clips)
    amap = attention_map(model, inputs, query, block, auto=auto)
    save_attention(amap, frames, out, style=style, top_k=top_k, **save_options)
    return amap


def measure_query_dependence(
    checkpoint: str | Path | None,
    source: str | Path | None,
    *,
    config: str | Path | None = None,
    model_name: str | None = None,
    overrides: Sequence[str] = (),
    block: str | None = None,
    num_clips: int = 1,
    num_queries: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """:func:`query_dependence` of every (or one) block over ``num_clips`` test clips of a video (or an image).

    Arguments are those of :func:`save_attention_figure` and :func:`query_dependence`.
    """
    model, recipe = load_model(checkpoint, config=config, model_name=model_name, overrides=overrides)
    source = _source_or_first_test_video(source, model, recipe)
    clips = [
        load_input(source, model, recipe, clip_index=k, num_clips=num_clips)[0]
        for k in range(1 if is_detector(model) else num_clips)
    ]
    return query_dependence(model, clips, block, num_queries=num_queries, seed=seed)


def _source_or_first_test_video(source: str | Path | None, model: nn.Module, recipe: DictConfig) -> Path:
    if source is not None:
        return Path(source)
    if is_detector(model):
        raise ValueError("a detector needs an image to look at: give one (--image)")
    from nlnet.data import build_dataset

    return build_dataset(recipe.data, "test").records[0].path
