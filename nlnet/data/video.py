"""Video decoding with PyAV and the official clip sampling of the Non-local paper.

Sampling follows the official Caffe2 data layer (``customized_video_io.cc``):

- training: a clip of ``num_frames`` frames ``sampling_rate`` apart starts at a uniform random frame in
  ``[0, n - num_frames * sampling_rate]`` (0 when the video is shorter), and frame indices are taken modulo
  the video length ``n``, so short videos wrap around;
- testing: clip ``k`` of ``K`` starts at ``floor(k * n / K)``, again modulo ``n``.

A deterministic single clip (validation) starts in the middle, at
``max(n - num_frames * sampling_rate, 0) // 2``.

Decoding never seeks: Kinetics-style clips are ~10 s with a single key frame at the start (FFmpeg's default
GOP of 250), so a seek would land on frame 0 anyway. Frames are decoded in presentation order up to the last
index needed, and only the sampled ones are converted to RGB.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import av
import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "VideoDecodeError",
    "center_clip_indices",
    "decode_frames",
    "eval_clip_indices",
    "train_clip_indices",
]


class VideoDecodeError(RuntimeError):
    """A video file is missing, cannot be opened, has no video stream or yields no frames."""


def train_clip_indices(video_frames: int, num_frames: int, sampling_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Frame indices of one training clip: random start, fixed stride, wrap-around.

    Args:
        video_frames: number of frames ``n`` in the video (> 0).
        num_frames: frames per clip ``T``.
        sampling_rate: stride ``tau`` between sampled frames.
        rng: source of the start frame.

    Returns:
        int64 array of shape (T,) with values in ``[0, n)``.
    """
    _check_clip_args(video_frames, num_frames, sampling_rate)
    last_start = max(video_frames - num_frames * sampling_rate, 0)
    start = int(rng.integers(0, last_start + 1))
    return (start + sampling_rate * np.arange(num_frames, dtype=np.int64)) % video_frames


def center_clip_indices(video_frames: int, num_frames: int, sampling_rate: int) -> np.ndarray:
    """Frame indices of the clip in the middle of the video (deterministic validation), wrap-around.

    Args:
        video_frames: number of frames ``n`` in the video (> 0).
        num_frames: frames per clip ``T``.
        sampling_rate: stride ``tau`` between sampled frames.

    Returns:
        int64 array of shape (T,) with values in ``[0, n)``.
    """
    _check_clip_args(video_frames, num_frames, sampling_rate)
    start = max(video_frames - num_frames * sampling_rate, 0) // 2
    return (start + sampling_rate * np.arange(num_frames, dtype=np.int64)) % video_frames


def eval_clip_indices(
    video_frames: int, num_frames: int, sampling_rate: int, clip_index: int, num_clips: int
) -> np.ndarray:
    """Frame indices of test clip ``clip_index`` of ``num_clips``: start ``floor(k * n / K)``, wrap-around.

    Args:
        video_frames: number of frames ``n`` in the video (> 0).
        num_frames: frames per clip ``T``.
        sampling_rate: stride ``tau`` between sampled frames.
        clip_index: ``k`` in ``[0, K)``.
        num_clips: ``K``.

    Returns:
        int64 array of shape (T,) with values in ``[0, n)``.
    """
    _check_clip_args(video_frames, num_frames, sampling_rate)
    if not 0 <= clip_index < num_clips:
        raise ValueError(f"clip_index must be in [0, {num_clips}), got {clip_index}")
    start = clip_index * video_frames // num_clips
    return (start + sampling_rate * np.arange(num_frames, dtype=np.int64)) % video_frames


def decode_frames(
    path: str | Path, choose_indices: Callable[[int], np.ndarray | Sequence[int]]
) -> tuple[np.ndarray, int]:
    """Decode the frames of a video that ``choose_indices`` asks for, given the video's length.

    The length ``n`` comes from the container's frame count. When the container does not record it, every
    frame is decoded (kept in YUV, unconverted) to count them. When the file holds fewer frames than its
    header says (a cut download whose index survived), the clip is re-chosen from the frames that exist.

    Args:
        path: video file.
        choose_indices: maps the frame count ``n`` to the wanted frame indices, each in ``[0, n)``; indices
            may repeat and come in any order. It may be called twice (see above), so it must be a pure
            function of ``n`` (draw random numbers from an RNG seeded per item, not from shared state).

    Returns:
        ``(frames, n)``: uint8 RGB array of shape (len(indices), H, W, 3) in the order of the indices, and the
        frame count used.

    Raises:
        VideoDecodeError: the file is missing or cannot be opened or decoded, or it has no frames.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoDecodeError(f"video file not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"no video stream in {path}")
            stream = container.streams.video[0]
            header_frames = stream.frames
            if header_frames > 0:
                indices = _as_indices(choose_indices(header_frames), header_frames)
                frames, decoded = _decode_selected(container.decode(stream), indices)
                if frames is not None:
                    return frames, header_frames
                if decoded == 0:
                    raise VideoDecodeError(f"no frame could be decoded from {path}")
                logger.warning(
                    "%s: the header says %d frames but only %d decode; sampling from those",
                    path,
                    header_frames,
                    decoded,
                )
            # Length unknown, or shorter than the header says: decode the whole video once, then choose.
        with av.open(str(path)) as container:
            all_frames = list(container.decode(container.streams.video[0]))
    except (av.error.FFmpegError, OSError) as error:
        raise VideoDecodeError(f"cannot decode {path}: {error}") from error
    if not all_frames:
        raise VideoDecodeError(f"no frame could be decoded from {path}")
    video_frames = len(all_frames)
    indices = _as_indices(choose_indices(video_frames), video_frames)
    return np.stack([all_frames[i].to_ndarray(format="rgb24") for i in indices]), video_frames


def _decode_selected(frame_iter, indices: np.ndarray) -> tuple[np.ndarray | None, int]:
    """Walk the decoded frames up to max(indices), converting only the wanted ones to RGB.

    Returns ``(frames, decoded)``; ``frames`` is None when the stream ended before the last wanted index.
    """
    wanted = set(indices.tolist())
    last = int(indices.max())
    rgb: dict[int, np.ndarray] = {}
    decoded = 0
    for frame_index, frame in enumerate(frame_iter):
        decoded = frame_index + 1
        if frame_index in wanted:
            rgb[frame_index] = frame.to_ndarray(format="rgb24")
        if frame_index == last:
            return np.stack([rgb[i] for i in indices.tolist()]), decoded
    return None, decoded


def _as_indices(indices: np.ndarray | Sequence[int], video_frames: int) -> np.ndarray:
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size == 0:
        raise ValueError("choose_indices returned no frame index")
    if indices.min() < 0 or indices.max() >= video_frames:
        raise ValueError(
            f"choose_indices returned indices in [{indices.min()}, {indices.max()}] for a video of "
            f"{video_frames} frames; expected values in [0, {video_frames})"
        )
    return indices


def _check_clip_args(video_frames: int, num_frames: int, sampling_rate: int) -> None:
    if video_frames < 1:
        raise ValueError(f"video_frames must be >= 1, got {video_frames}")
    if num_frames < 1 or sampling_rate < 1:
        raise ValueError(
            f"num_frames and sampling_rate must be >= 1, got num_frames={num_frames}, sampling_rate={sampling_rate}"
        )
