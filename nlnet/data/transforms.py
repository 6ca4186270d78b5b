"""Spatial transforms of the Non-local paper's video pipeline: scale jitter, crops, flips, normalisation.

Official recipe (facebookresearch/video-nonlocal-net, ``customized_video_input_op.h``):

- training: the shorter side is rescaled to a uniform random integer in ``[256, 320]`` (aspect ratio kept),
  then a random 224x224 crop and a horizontal flip with probability 0.5, the same for every frame of a clip;
- testing: the shorter side is rescaled to 256, then 3 crops of 256x256 at the start, centre and end of the
  longer side (the network runs fully convolutionally on them);
- normalisation: ``(pixel - 114.75) / 57.375`` on RGB, i.e. mean 0.45 and std 0.225 on a [0, 1] scale.

Frames travel as uint8 tensors of shape (T, H, W, 3), as decoded, and leave as float32 clips (3, T, H, W), or
as uint8 clips (3, T, H, W) when the transform is built with ``normalized=False`` (``normalize_clips`` then
finishes them on the device).
Every size is a parameter, so the same code serves 32x32 toy videos and Kinetics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "KINETICS_MEAN",
    "KINETICS_STD",
    "EvalViews",
    "TrainAugment",
    "crop_offsets",
    "normalize",
    "normalize_clips",
    "resize_short_side",
]

KINETICS_MEAN = 114.75
KINETICS_STD = 57.375


def resize_short_side(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Rescale so that the shorter side is ``size`` pixels, keeping the aspect ratio (bilinear, antialiased).

    Args:
        frames: uint8 tensor (T, H, W, 3).
        size: new length of the shorter side.

    Returns:
        uint8 tensor (T, H', W', 3) with ``min(H', W') == size``; the longer side is rounded to a whole
        pixel.
    """
    _check_frames(frames)
    height, width = frames.shape[1:3]
    if height <= width:
        new_height, new_width = size, max(size, round(width * size / height))
    else:
        new_height, new_width = max(size, round(height * size / width)), size
    if (new_height, new_width) == (height, width):
        return frames
    # (T, H, W, 3) -> (T, 3, H, W): torchvision resizes the last two dims; its uint8 kernel avoids a copy.
    resized = TF.resize(frames.permute(0, 3, 1, 2), [new_height, new_width], antialias=True)
    return resized.permute(0, 2, 3, 1)


def crop_offsets(length: int, size: int, num_crops: int) -> list[int]:
    """Offsets of ``num_crops`` windows of ``size`` spread evenly along a side of ``length`` pixels.

    One crop is centred (``(length - size) // 2``); several go from the start (0) to the end
    (``length - size``), so 3 crops are start, centre, end as in the official test protocol.

    Args:
        length: side length in pixels.
        size: window length, ``<= length``.
        num_crops: number of windows (>= 1).

    Returns:
        list of ``num_crops`` offsets.
    """
    if size > length:
        raise ValueError(f"crop of {size} pixels does not fit in a side of {length} pixels")
    if num_crops < 1:
        raise ValueError(f"num_crops must be >= 1, got {num_crops}")
    if num_crops == 1:
        return [(length - size) // 2]
    return [k * (length - size) // (num_crops - 1) for k in range(num_crops)]


def normalize(frames: torch.Tensor, mean: float | Sequence[float], std: float | Sequence[float]) -> torch.Tensor:
    """Turn uint8 frames into normalised float clips, channels first.

    Args:
        frames: uint8 tensor (..., T, H, W, 3), RGB; leading dims (e.g. views) are kept.
        mean: per-channel (RGB) or shared mean in pixel units (0-255).
        std: per-channel (RGB) or shared standard deviation in pixel units.

    Returns:
        float32 tensor (..., 3, T, H, W) equal to ``(frames - mean) / std``.
    """
    if frames.dtype != torch.uint8 or frames.ndim < 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 frames of shape (..., T, H, W, 3), got dtype {frames.dtype} "
            f"and shape {tuple(frames.shape)}"
        )
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
    if mean_t.numel() not in (1, 3) or std_t.numel() not in (1, 3):
        raise ValueError(f"mean and std must be one number or 3 (RGB), got mean={mean}, std={std}")
    channels_first = frames.movedim(-1, -4)  # (..., T, H, W, 3) -> (..., 3, T, H, W), a strided view
    # Converting into a contiguous buffer, then working in place, is ~2x faster than broadcasting arithmetic
    # over the strided view.
    clip = torch.empty(channels_first.shape, dtype=torch.float32)
    clip.copy_(channels_first)
    return clip.sub_(mean_t.view(-1, 1, 1, 1)).div_(std_t.view(-1, 1, 1, 1))


def normalize_clips(
    clips: torch.Tensor, mean: float | Sequence[float], std: float | Sequence[float]
) -> torch.Tensor:
    """``(clips - mean) / std`` in float32 for uint8 clips already channels first, on their own device.

    Loaders send uint8 clips (a quarter of float32's bytes through shared memory and the host-to-device copy)
    and the engine normalises them here after the copy; the arithmetic is that of :func:`normalize`, so the
    values are the same.

    Args:
        clips: uint8 tensor (..., 3, T, H, W), RGB.
        mean: per-channel (RGB) or shared mean in pixel units (0-255).
        std: per-channel (RGB) or shared standard deviation in pixel units.
    """
    if clips.dtype != torch.uint8 or clips.ndim < 4 or clips.shape[-4] != 3:
        raise ValueError(
            f"expected uint8 clips of shape (..., 3, T, H, W), got dtype {clips.dtype} and shape {tuple(clips.shape)}"
        )
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
    if mean_t.numel() not in (1, 3) or std_t.numel() not in (1, 3):
        raise ValueError(f"mean and std must be one number or 3 (RGB), got mean={mean}, std={std}")
    out = clips.to(torch.float32)
    return out.sub_(mean_t.to(clips.device).view(-1, 1, 1, 1)).div_(std_t.to(clips.device).view(-1, 1, 1, 1))


def _finish(frames: torch.Tensor, mean: Any, std: Any, normalized: bool) -> torch.Tensor:
    if normalized:
        return normalize(frames, mean, std)
    return frames.movedim(-1, -4).contiguous()


class TrainAugment:
    """Training transform: random shorter-side scale, random square crop, horizontal flip, normalisation.

    Every random choice comes from the generator passed to ``__call__``, drawn in a fixed order (scale, crop
    top, crop left, flip), so a clip is a pure function of the frames and the generator's seed.

    Args:
        jitter_scales: inclusive ``(min, max)`` range of the shorter side, e.g. ``(256, 320)``.
        crop_size: side of the square crop, ``<= min``.
        mean: normalisation mean in pixel units (one number or RGB).
        std: normalisation standard deviation in pixel units (one number or RGB).
        flip_prob: probability of a horizontal flip of the whole clip.
        normalized: return normalised float32 clips; False returns the uint8 pixels, channels first, for
            :func:`normalize_clips` to finish on the device.
    """

    def __init__(
        self,
        jitter_scales: Sequence[int],
        crop_size: int,
        *,
        mean: float | Sequence[float] = KINETICS_MEAN,
        std: float | Sequence[float] = KINETICS_STD,
        flip_prob: float = 0.5,
        normalized: bool = True,
    ) -> None:
        scales = [int(s) for s in jitter_scales]
        if len(scales) != 2 or not 0 < scales[0] <= scales[1]:
            raise ValueError(f"jitter_scales must be [min, max] with 0 < min <= max, got {list(jitter_scales)}")
        if not 0 < crop_size <= scales[0]:
            raise ValueError(f"crop_size must be in [1, {scales[0]}] (the smallest jitter scale), got {crop_size}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.jitter_scales = (scales[0], scales[1])
        self.crop_size = int(crop_size)
        self.mean = mean
        self.std = std
        self.flip_prob = flip_prob
        self.normalized = bool(normalized)

    def __call__(self, frames: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Augment one clip.

        Args:
            frames: uint8 tensor (T, H, W, 3), RGB.
            rng: generator for the scale, crop position and flip.

        Returns:
            float32 tensor (3, T, crop_size, crop_size) (uint8 when not ``normalized``).
        """
        scale = int(rng.integers(self.jitter_scales[0], self.jitter_scales[1] + 1))
        frames = resize_short_side(frames, scale)
        height, width = frames.shape[1:3]
        top = int(rng.integers(0, height - self.crop_size + 1))
        left = int(rng.integers(0, width - self.crop_size + 1))
        frames = frames[:, top : top + self.crop_size, left : left + self.crop_size]
        if rng.random() < self.flip_prob:
            frames = frames.flip(2)
        return _finish(frames, self.mean, self.std, self.normalized)


class EvalViews:
    """Test transform: shorter side to ``scale``, then ``num_crops`` square crops along the longer side.

    Args:
        scale: length of the shorter side after resizing (256 officially).
        crop_size: side of the square crops, ``<= scale`` (256 officially: full-height crops).
        num_crops: crops per clip; 3 gives start, centre and end of the longer side, 1 the centre.
        mean: normalisation mean in pixel units (one number or RGB).
        std: normalisation standard deviation in pixel units (one number or RGB).
        normalized: return normalised float32 views; False returns the uint8 pixels, channels first.
    """

    def __init__(
        self,
        scale: int,
        crop_size: int,
        num_crops: int,
        *,
        mean: float | Sequence[float] = KINETICS_MEAN,
        std: float | Sequence[float] = KINETICS_STD,
        normalized: bool = True,
    ) -> None:
        if not 0 < crop_size <= scale:
            raise ValueError(f"crop_size must be in [1, scale={scale}], got {crop_size}")
        if num_crops < 1:
            raise ValueError(f"num_crops must be >= 1, got {num_crops}")
        self.scale = int(scale)
        self.crop_size = int(crop_size)
        self.num_crops = int(num_crops)
        self.mean = mean
        self.std = std
        self.normalized = bool(normalized)

    def __call__(self, frames: torch.Tensor, num_clips: int = 1) -> torch.Tensor:
        """Cut the views of ``num_clips`` clips of equal length, stored one after the other.

        Args:
            frames: uint8 tensor (num_clips * T, H, W, 3), RGB.
            num_clips: number of clips in ``frames``; they share one resize.

        Returns:
            float32 (uint8 when not ``normalized``) tensor (num_clips * num_crops, 3, T, crop_size, crop_size),
            clip-major: view
            ``k * num_crops + j`` is crop ``j`` of clip ``k``; crops go from the start of the longer side to its
            end.
        """
        if num_clips < 1 or frames.shape[0] % num_clips:
            raise ValueError(f"{frames.shape[0]} frames cannot be split into {num_clips} clips of equal length")
        frames = resize_short_side(frames, self.scale)
        height, width = frames.shape[1:3]
        size = self.crop_size
        if width >= height:
            top = (height - size) // 2
            corners = [(top, left) for left in crop_offsets(width, size, self.num_crops)]
        else:
            left = (width - size) // 2
            corners = [(top, left) for top in crop_offsets(height, size, self.num_crops)]
        clip_frames = frames.shape[0] // num_clips
        # Crop in uint8: (crops, K*T, S, S, 3) -> (crops, K, T, S, S, 3) -> (K, crops, T, S, S, 3).
        crops = torch.stack([frames[:, t : t + size, l : l + size] for t, l in corners])
        crops = crops.view(len(corners), num_clips, clip_frames, size, size, 3).transpose(0, 1)
        views = crops.reshape(num_clips * len(corners), clip_frames, size, size, 3)
        return _finish(views, self.mean, self.std, self.normalized)


def _check_frames(frames: torch.Tensor) -> None:
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 frames of shape (T, H, W, 3), got dtype {frames.dtype} and shape {tuple(frames.shape)}"
        )
