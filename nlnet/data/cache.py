"""Decode a training set once and cut every clip from the kept frames (the recipe switch ``data.cache_decoded``).

On small sets of short videos (the built-in set; UCF101 or HMDB51 re-encoded small enough to fit in memory)
opening and decoding one file per clip costs far more than the training step. `DecodedVideos` decodes every video of a
`VideoClipDataset` once, in ``num_workers`` loader processes, and keeps all its frames as uint8 RGB arrays in
the main process; the dataset then reads its clips from them instead of from the files. Clip sampling and
augmentation are untouched, so every epoch draws exactly the clips the files would give (tested clip for clip).

Where the frames live: in ordinary memory of the main process, built before the training loader starts its
workers. Linux's default ``fork`` start gives each worker the parent's pages copy-on-write, so the frames are
held once whatever the number of workers (under a ``spawn`` start each worker would get its own copy). The
cost is the decoded size of the whole set, ``sum(frames x height x width x 3)`` bytes, which
`DecodedVideos.nbytes` reports: 197 MB for the built-in set's 8000 clips of 8 x 32 x 32 frames; for UCF101
(13,320 videos of about 186 frames) about 570 GB at its native 320 x 240 and still about 47 GB re-encoded to
112 x 112 at half the frame rate, so on such sets the switch pays only where the decoded set fits in memory.
A video that cannot be decoded is remembered with its error and raises `VideoDecodeError` each
time it is read, so the dataset skips, names and counts it as it does without the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from nlnet.data.datasets import VideoClipDataset
from nlnet.data.video import VideoDecodeError, _as_indices, decode_frames

logger = logging.getLogger(__name__)

__all__ = ["DecodedVideos", "cache_decoded"]


class _WholeVideos(Dataset):
    """Item ``i``: ``(i, every frame of video i)`` or ``(i, the decoding error as text)``."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | str]:
        try:
            frames, _ = decode_frames(self.paths[index], np.arange)
        except VideoDecodeError as error:
            return index, str(error)
        return index, frames


def _as_is(item: tuple[int, np.ndarray | str]) -> tuple[int, np.ndarray | str]:
    # No conversion to tensors: a numpy array is pickled through the worker's pipe into ordinary memory, where a
    # tensor would arrive in a shared-memory segment held open by one file descriptor per video.
    return item


def _file_stamp(path: Path) -> tuple[int, int]:
    """(size, modification time in ns) of a file; (-1, -1) when it is missing."""
    try:
        info = path.stat()
    except OSError:
        return -1, -1
    return info.st_size, info.st_mtime_ns


# The last set decoded in this process, with the stamps of its files: a study that trains several networks on
# the same files in one process (nlnet demo, nlnet ablate) decodes them once. One entry, so memory stays bounded.
_last_built: list = []


class DecodedVideos:
    """Every frame of a list of videos, decoded once; called like `nlnet.data.video.decode_frames`.

    Args:
        frames: path -> uint8 RGB frames (n, H, W, 3) of the whole video.
        errors: path -> why it could not be decoded.
    """

    def __init__(self, frames: dict[Path, np.ndarray], errors: dict[Path, str]) -> None:
        self.frames = frames
        self.errors = errors

    @classmethod
    def build(cls, paths: Sequence[str | Path], *, num_workers: int = 0, progress: bool = True) -> DecodedVideos:
        """Decode every frame of ``paths`` with PyAV, in ``num_workers`` processes (0: in this one).

        A second call over the same files (same paths, sizes and modification times) in the same process returns
        the cache the first built, without decoding again.
        """
        paths = [Path(path) for path in paths]
        stamp = tuple((path, *_file_stamp(path)) for path in paths)
        if _last_built and _last_built[0] == stamp:
            return _last_built[1]
        loader = DataLoader(_WholeVideos(paths), batch_size=None, num_workers=num_workers, collate_fn=_as_is)
        frames: dict[Path, np.ndarray] = {}
        errors: dict[Path, str] = {}
        for index, result in tqdm(loader, total=len(paths), desc="decode once", disable=not progress):
            if isinstance(result, str):
                errors[paths[index]] = result
            else:
                frames[paths[index]] = result
        if errors:
            logger.warning("%d of %d videos cannot be decoded and will be skipped", len(errors), len(paths))
        cache = cls(frames, errors)
        _last_built[:] = [stamp, cache]
        return cache

    @property
    def nbytes(self) -> int:
        """Bytes held by the decoded frames."""
        return sum(video.nbytes for video in self.frames.values())

    def __call__(
        self,
        path: str | Path,
        choose_indices: Callable[[int], np.ndarray | Sequence[int]],
        *,
        seek: bool = True,
        threads: int = 0,
    ) -> tuple[np.ndarray, int]:
        """``(frames, n)`` exactly as ``decode_frames(path, choose_indices)`` returns them, from memory
        (``decode_frames``' ``seek`` and ``threads`` are taken for its signature; frames in memory need neither).

        Raises:
            VideoDecodeError: the video could not be decoded when the cache was built.
            KeyError: the path is not one of the cached videos.
        """
        path = Path(path)
        if path in self.errors:
            raise VideoDecodeError(self.errors[path])
        if path not in self.frames:
            raise KeyError(f"{path} is not among the {len(self.frames)} decoded videos of this cache")
        video = self.frames[path]
        indices = _as_indices(choose_indices(len(video)), len(video))
        return video[indices], len(video)


def cache_decoded(dataset: VideoClipDataset, *, num_workers: int = 0, progress: bool = True) -> DecodedVideos:
    """Decode ``dataset``'s videos once and make it read its clips from the decoded frames; returns the cache."""
    cache = DecodedVideos.build([record.path for record in dataset.records], num_workers=num_workers, progress=progress)
    dataset.read_frames = cache
    logger.info("decoded %d videos once: %.1f MB kept in memory", len(cache.frames), cache.nbytes / 1e6)
    return cache
