"""Video decoding with PyAV and the official clip sampling of the Non-local paper.

Sampling follows the official Caffe2 data layer (``customized_video_io.cc``):

- training: a clip of ``num_frames`` frames ``sampling_rate`` apart starts at a uniform random frame in
  ``[0, n - num_frames * sampling_rate]`` (0 when the video is shorter), and frame indices are taken modulo
  the video length ``n``, so short videos wrap around;
- testing: clip ``k`` of ``K`` starts at ``floor(k * n / K)``, again modulo ``n``.

A deterministic single clip (validation) starts in the middle, at
``max(n - num_frames * sampling_rate, 0) // 2``.

Frame ``i`` of a video is the ``i``-th frame the decoder outputs when it decodes the file from the start (frames
come out in presentation order, so with B-frames this is the ``i``-th smallest presentation timestamp, whatever
the frame rate). Only the sampled frames are converted to RGB, and decoding stops at the last one needed.

Seeking: a Kinetics download has one key frame per 250 frames (FFmpeg's default GOP), so a seek would land on
frame 0 anyway; files re-encoded with ``nlnet data prepare`` have one every 32, and there decoding starts at the
key frame at or before the first wanted frame (and again before a later wanted frame when that skips more than
8 frames) instead of at frame 0. The demuxer's index, read with the header, gives each key frame's decode
position ``d``; when the key frame starts a closed group (the packets decoded before it show before it, as
encoders write them, and those decoded after it show after it) it is frame ``d``, and decoding from it yields
the very frames a decode from the start yields there. The second condition and the frame order are checked
packet by packet. Whenever the file cannot guarantee the same frames (no frame count, an index that does not
list every frame or marks one discarded, a seek that lands elsewhere, an open group's leading pictures, a
frame out of presentation order, a stream that ends early), the clip is decoded from the start instead.

Skipping: packets are read a group at a time, so each packet's frame index is known before it is decoded (the
rank of its presentation timestamp in the group). A frame the clip does not show is sent to the decoder with
the instruction to drop it if no other frame refers to it; reference frames are always decoded, so the frames
that come out are the same. H.264 files carry such non-reference frames (x264's default B-frames: about 40 %
of the frames; ``nlnet data prepare``'s layout: 7 in every 8), and a clip that samples every 8th frame of a
prepared file decodes 18 frames on average, key frame included, for the 57 it spans.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

logger = logging.getLogger(__name__)

# A seek restarts the decoder at a key frame (a costly intra frame, then the B-frame delay): it pays when it
# skips more frames than this.
_MIN_FRAMES_SKIPPED = 8

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
    path: str | Path,
    choose_indices: Callable[[int], np.ndarray | Sequence[int]],
    *,
    seek: bool = True,
    threads: int = 0,
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
        seek: start decoding at the key frame before each run of wanted frames when the file allows it (see the
            module docstring); False always decodes from the start. The frames are the same either way.
        threads: decoding threads; 0 lets FFmpeg choose (one per core). Loader workers, one per core, are
            faster with 1 (the threads of several workers would compete for the same cores).

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
            stream = _video_stream(container, threads)
            header_frames = stream.frames
            if header_frames > 0:
                indices = _as_indices(choose_indices(header_frames), header_frames)
                keys = _key_frames(stream, header_frames) if seek else None
                frames = None if keys is None else _decode_seeking(container, stream, indices, keys)
                if frames is not None:
                    return frames, header_frames
                if keys is None:
                    frames, decoded = _decode_selected(container.decode(stream), indices)
                else:  # the seeks moved the demuxer: decode from a fresh start
                    with av.open(str(path)) as fresh:
                        frames, decoded = _decode_selected(fresh.decode(_video_stream(fresh, threads)), indices)
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
            all_frames = list(container.decode(_video_stream(container, threads)))
    except (av.error.FFmpegError, OSError) as error:
        raise VideoDecodeError(f"cannot decode {path}: {error}") from error
    if not all_frames:
        raise VideoDecodeError(f"no frame could be decoded from {path}")
    video_frames = len(all_frames)
    indices = _as_indices(choose_indices(video_frames), video_frames)
    to_rgb = _RGBConverter()
    return np.stack([to_rgb(all_frames[i]) for i in indices]), video_frames


def _video_stream(container, threads: int):
    stream = container.streams.video[0]
    if threads > 0:
        stream.codec_context.thread_count = threads
    return stream


@dataclass(frozen=True)
class _KeyFrames:
    """The key frames a seek may land on: their frame indices, their packets' dts and a timestamp to seek to."""

    frames: np.ndarray  # sorted frame indices (decode positions) of the key frames
    dts: list[int]
    # FFmpeg's mp4 demuxer seeks by presentation time, which the index does not hold; the dts of the group's last
    # packet is at or after the key frame's pts (pts - dts is the B-frame delay, shorter than a group) and before
    # the next key frame's dts and pts, so a backward seek to it lands on the key frame whichever it compares.
    seek_to: list[int]


class _SeekUnsafe(Exception):
    """Decoding from a key frame would not give what decoding from the start gives."""


def _key_frames(stream, video_frames: int) -> _KeyFrames | None:
    """The key frames of the demuxer's index (read with the header, no packet is read); None if unusable."""
    entries = stream.index_entries
    if len(entries) != video_frames:
        return None  # an index that does not list every frame (or none): positions are unknown
    positions, timestamps = [], []
    for position, entry in enumerate(entries):
        if entry.is_discard:
            return None  # a discarded packet yields no frame, so positions would not be frame indices
        timestamps.append(entry.timestamp)
        if entry.is_keyframe:
            positions.append(position)
    if not positions or positions[0] != 0:
        return None
    group_ends = [*positions[1:], len(entries)]
    return _KeyFrames(
        np.asarray(positions, dtype=np.int64),
        [timestamps[p] for p in positions],
        [timestamps[end - 1] for end in group_ends],
    )


def _decode_seeking(container, stream, indices: np.ndarray, keys: _KeyFrames) -> np.ndarray | None:
    """The wanted frames, runs far apart each decoded from its key frame; None to decode from the start."""
    wanted = np.unique(indices)
    rgb: dict[int, np.ndarray] = {}
    to_rgb = _RGBConverter()
    decoded = seeks = 0
    try:
        position = 0
        while position < len(wanted):
            key = int(np.searchsorted(keys.frames, wanted[position], side="right")) - 1
            seeks += 1
            for frame_index, frame in _frames_from_key(container, stream, keys, key, wanted):
                decoded += 1
                if frame_index < wanted[position]:
                    continue
                if frame_index > wanted[position]:
                    raise _SeekUnsafe(f"frame {wanted[position]} was not decoded")
                rgb[frame_index] = to_rgb(frame)
                position += 1
                if position == len(wanted):
                    break
                # Seek again only when that skips enough frames to pay for the decoder's restart.
                next_key = keys.frames[np.searchsorted(keys.frames, wanted[position], side="right") - 1]
                if next_key - frame_index > _MIN_FRAMES_SKIPPED:
                    break
            else:
                return None  # the stream ended early: the no-seek path handles a short file
    except _SeekUnsafe as why:
        logger.debug("decoding from the start: %s", why)
        return None
    finally:
        _skip_non_reference(stream, False)
    logger.debug(
        "seek path: %d frames decoded after %d seeks for frames %d to %d", decoded, seeks, wanted[0], wanted[-1]
    )
    return np.stack([rgb[i] for i in indices.tolist()])


def _frames_from_key(
    container, stream, keys: _KeyFrames, key: int, wanted: np.ndarray
) -> Iterator[tuple[int, av.VideoFrame]]:
    """Seek to key frame ``key`` and yield ``(frame index, frame)`` in presentation order, checking each step.

    Packets are read a closed group at a time. A group's frames are the decode positions from its key frame to
    the next, and frame ``d + r`` is the packet with the ``r``-th smallest presentation timestamp of the group
    that starts at position ``d``. A packet that is neither wanted nor a reference for others (the
    non-reference B-frames an encoder places between references) is not decoded: the decoder is told to skip
    it, which leaves every other frame as it is. Checked on every packet read: the seek lands on the key frame,
    no picture of a group shows before its key frame (an open group's leading pictures) or after the next key
    frame, timestamps are unique, and frames come out in increasing presentation order.
    """
    container.seek(keys.seek_to[key], backward=True, any_frame=False, stream=stream)
    wanted_set = set(wanted.tolist())
    index_of: dict[int, int] = {}
    group: list[av.Packet] = []
    first = int(keys.frames[key])
    last_pts = None
    for packet in container.demux(stream):
        if packet.size and not group and first == keys.frames[key]:
            if packet.dts != keys.dts[key] or not packet.is_keyframe or packet.pts is None:
                raise _SeekUnsafe(f"the seek to frame {first} landed on dts {packet.dts}")
        if packet.size and packet.pts is None:
            raise _SeekUnsafe(f"a packet after frame {first} has no presentation timestamp")
        if packet.size and not (packet.is_keyframe and group):
            group.append(packet)
            continue
        # A new key frame (or the end of the stream): the group read so far is complete.
        timestamps = sorted(p.pts for p in group)
        if group and group[0].pts != timestamps[0]:
            raise _SeekUnsafe(f"the group of frame {first} is open (leading pictures)")
        if len(set(timestamps)) != len(timestamps) or (packet.size and packet.pts <= timestamps[-1]):
            raise _SeekUnsafe(f"the group of frame {first} overlaps the next or repeats a timestamp")
        index_of.update((pts, first + rank) for rank, pts in enumerate(timestamps))
        for member in [*group, *([] if packet.size else [packet])]:
            if member.size:
                _skip_non_reference(stream, index_of[member.pts] not in wanted_set)
            for frame in member.decode():
                if frame.pts not in index_of or (last_pts is not None and frame.pts <= last_pts):
                    raise _SeekUnsafe(f"a frame after frame {first} came out with pts {frame.pts}, out of order")
                last_pts = frame.pts
                yield index_of[frame.pts], frame
        first += len(group)
        group = [packet] if packet.size else []


def _skip_non_reference(stream, skip: bool) -> None:
    """Tell the decoder to drop (or decode) the non-reference frames of the packets sent next."""
    stream.codec_context.skip_frame = "NONREF" if skip else "DEFAULT"


class _RGBConverter:
    """Frames to uint8 RGB arrays through one swscale context for the whole clip.

    ``VideoFrame.to_ndarray(format="rgb24")`` sets up a conversion context for every frame, which here costs
    more than the conversion (2.5x the time per frame); the pixels are the same.
    """

    def __init__(self) -> None:
        self.reformatter = VideoReformatter()

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        return self.reformatter.reformat(frame, format="rgb24").to_ndarray()


def _decode_selected(frame_iter, indices: np.ndarray) -> tuple[np.ndarray | None, int]:
    """Walk the decoded frames up to max(indices), converting only the wanted ones to RGB.

    Returns ``(frames, decoded)``; ``frames`` is None when the stream ended before the last wanted index.
    """
    wanted = set(indices.tolist())
    to_rgb = _RGBConverter()
    last = int(indices.max())
    rgb: dict[int, np.ndarray] = {}
    decoded = 0
    for frame_index, frame in enumerate(frame_iter):
        decoded = frame_index + 1
        if frame_index in wanted:
            rgb[frame_index] = to_rgb(frame)
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
