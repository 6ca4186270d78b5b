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

Training crops are cut before resizing: the random scale and crop position are drawn on the frame resized to
the drawn shorter side, as in the official code, but only the window of the source frame that lands in the crop
(rounded outwards to whole source pixels) is resized, in uint8 with one antialiased bilinear interpolation, to
the size it has at the drawn scale, and the crop is cut from that. The same window can be cut on the training
device instead (``TrainAugment.draw`` in the loader worker, ``TrainAugment.apply_batch`` after the copy), with
the same pixels.
Every size is a parameter, so the same code serves 32x32 toy videos and Kinetics.
"""

from __future__ import annotations

import math
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
    new_height, new_width = _short_side_size(height, width, size)
    if (new_height, new_width) == (height, width):
        return frames
    # (T, H, W, 3) -> (T, 3, H, W): torchvision resizes the last two dims; its uint8 kernel avoids a copy.
    resized = TF.resize(frames.permute(0, 3, 1, 2), [new_height, new_width], antialias=True)
    return resized.permute(0, 2, 3, 1)


def _short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the shorter side ``size`` and the aspect ratio kept, to a whole pixel."""
    if height <= width:
        return size, max(size, round(width * size / height))
    return max(size, round(height * size / width)), size


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

    Every random choice comes from the generator passed to ``__call__`` (or ``draw``), in a fixed order (scale,
    crop top, crop left, flip), so a clip is a pure function of the frames and the generator's seed. The crop
    is cut from the source frame before resizing (see the module docstring).

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

    def draw(self, height: int, width: int, rng: np.random.Generator) -> torch.Tensor:
        """Draw one clip's augmentation for frames of ``height`` x ``width``: the source window and the flip.

        Returns:
            int64 tensor of 9 numbers: the source window (top, left, height, width), the size it is resized to
            (height, width), the crop's offset in it (top, left) and the flip (0 or 1).
        """
        scale = int(rng.integers(self.jitter_scales[0], self.jitter_scales[1] + 1))
        new_height, new_width = _short_side_size(height, width, scale)
        top = int(rng.integers(0, new_height - self.crop_size + 1))
        left = int(rng.integers(0, new_width - self.crop_size + 1))
        flip = int(rng.random() < self.flip_prob)
        rows = _window(top, self.crop_size, height, new_height)
        columns = _window(left, self.crop_size, width, new_width)
        return torch.tensor([rows[0], columns[0], rows[1], columns[1], rows[2], columns[2], rows[3], columns[3], flip])

    def apply(self, frames: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """Cut, resize and flip one clip as ``window`` (from :meth:`draw`) says, on the frames' device.

        Args:
            frames: uint8 tensor (T, H, W, 3), RGB (H and W may exceed the frames the window was drawn for).
            window: the 9 int64 numbers of :meth:`draw`.

        Returns:
            uint8 tensor (T, 3, crop_size, crop_size).
        """
        top, left, height, width, out_height, out_width, crop_top, crop_left, flip = window.tolist()
        # (T, H, W, 3) -> (T, 3, h, w), a strided view: torchvision's uint8 kernel reads channels-last directly.
        region = frames[:, top : top + height, left : left + width].permute(0, 3, 1, 2)
        if (out_height, out_width) != (height, width):
            region = TF.resize(region, [out_height, out_width], antialias=True)
        size = self.crop_size
        crop = region[:, :, crop_top : crop_top + size, crop_left : crop_left + size]
        return crop.flip(-1) if flip else crop

    def apply_batch(self, frames: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """Augment a batch of source clips on their device: the device side of the loader.

        Args:
            frames: uint8 tensor (B, T, H, W, 3), each clip at the top left, padded to the batch's largest size.
            windows: int64 (B, 9) from :meth:`draw` (on the CPU: they are read as Python numbers).

        Returns:
            uint8 tensor (B, 3, T, crop_size, crop_size), the clips of ``__call__`` before normalisation.
        """
        crops = torch.stack([self.apply(clip, window) for clip, window in zip(frames, windows, strict=True)])
        # (B, T, 3, S, S) -> (B, 3, T, S, S), laid out as the worker's clips: a convolution's rounding depends on it.
        return crops.transpose(1, 2).contiguous()

    def __call__(self, frames: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Augment one clip.

        Args:
            frames: uint8 tensor (T, H, W, 3), RGB.
            rng: generator for the scale, crop position and flip.

        Returns:
            float32 tensor (3, T, crop_size, crop_size) (uint8 when not ``normalized``).
        """
        _check_frames(frames)
        crop = self.apply(frames, self.draw(frames.shape[1], frames.shape[2], rng)).transpose(0, 1)
        if self.normalized:
            return normalize_clips(crop, self.mean, self.std).contiguous()
        return crop.contiguous()


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


def _window(start: int, crop: int, source: int, resized: int) -> tuple[int, int, int, int]:
    """The source pixels under ``[start, start + crop)`` of a side resized from ``source`` to ``resized`` pixels.

    Returns ``(first, count, count_resized, offset)``: source pixels ``[first, first + count)`` (rounded outwards),
    resized to ``count_resized`` pixels, in which the crop starts at ``offset``.
    """
    ratio = source / resized
    first = math.floor(start * ratio)
    count = min(source, math.ceil((start + crop) * ratio)) - first
    count_resized = max(crop, round(count / ratio))
    offset = min(max(round(start - first / ratio), 0), count_resized - crop)
    return first, count, count_resized, offset


def _check_frames(frames: torch.Tensor) -> None:
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 frames of shape (T, H, W, 3), got dtype {frames.dtype} and shape {tuple(frames.shape)}"
        )
