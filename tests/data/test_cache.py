"""``data.cache_decoded``: clips cut from frames decoded once equal the clips decoded from the files.

The videos are the built-in set's real H.264 files (tiny: 12 clips); the training augmentation is made
non-trivial (scale jitter, crops, flips) so that equal clips mean equal draws, not equal whole frames.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nlnet.data import build_dataset, build_loader
from nlnet.data.builtin import write_builtin
from nlnet.data.cache import DecodedVideos, cache_decoded
from nlnet.data.video import VideoDecodeError, decode_frames


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory):
    folder = write_builtin(tmp_path_factory.mktemp("builtin"), num_train=12, num_test=2, seed=3)
    return {
        "format": "path_csv",
        "root": str(folder),
        "train_list": str(folder / "train.csv"),
        "num_classes": 4,
        "num_frames": 4,
        "sampling_rate": 1,
        "train_jitter_scales": [32, 44],
        "train_crop": 28,
        "class_names": ["square", "disc", "triangle", "plus"],
    }


def _epoch(dataset, epoch: int) -> list[torch.Tensor]:
    dataset.set_epoch(epoch)
    return [dataset[index]["clip"] for index in range(len(dataset))]


def test_cached_epochs_equal_uncached_epochs_clip_for_clip(data_cfg):
    plain = build_dataset(data_cfg, "train", normalized=False)
    cached = build_dataset(data_cfg, "train", normalized=False)
    cache = cache_decoded(cached, num_workers=2, progress=False)
    assert len(cache.frames) == 12 and not cache.errors
    assert cache.nbytes == 12 * 8 * 32 * 32 * 3  # every frame of every 8-frame 32 x 32 clip, uint8
    for epoch in (0, 1, 5):
        for mine, theirs in zip(_epoch(cached, epoch), _epoch(plain, epoch), strict=True):
            assert mine.dtype == torch.uint8 and torch.equal(mine, theirs)
    # The draws do change between epochs (otherwise the equality above would prove little).
    assert not all(torch.equal(a, b) for a, b in zip(_epoch(cached, 0), _epoch(cached, 1), strict=True))


def test_cache_serves_loader_workers_in_the_same_order(data_cfg):
    plain = build_dataset(data_cfg, "train", normalized=False)
    cached = build_dataset(data_cfg, "train", normalized=False)
    cache_decoded(cached, progress=False)
    batches = []
    for dataset, workers in ((plain, 0), (cached, 2)):
        loader = build_loader(dataset, 4, shuffle=True, num_workers=workers, seed=7, drop_last=True)
        dataset.set_epoch(2)
        batches.append(list(loader))
    for mine, theirs in zip(batches[1], batches[0], strict=True):
        assert mine["index"].tolist() == theirs["index"].tolist()
        assert torch.equal(mine["clip"], theirs["clip"]) and torch.equal(mine["label"], theirs["label"])


def test_cache_answers_like_decode_frames_and_keeps_decoding_errors(data_cfg, tmp_path):
    source = sorted(Path(data_cfg["root"]).glob("videos/train/*.mp4"))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    copy = tmp_path / "copy.mp4"
    shutil.copy(source[0], copy)
    cache = DecodedVideos.build([copy, broken, tmp_path / "missing.mp4"], progress=False)
    picks = lambda n: np.array([n - 1, 0, 2])  # noqa: E731
    frames, count = cache(copy, picks)
    expected, expected_count = decode_frames(copy, picks)
    assert count == expected_count == 8 and np.array_equal(frames, expected)
    assert set(cache.errors) == {broken, tmp_path / "missing.mp4"}
    with pytest.raises(VideoDecodeError, match="broken.mp4"):
        cache(broken, picks)
    with pytest.raises(VideoDecodeError, match="not found"):
        cache(tmp_path / "missing.mp4", picks)
    with pytest.raises(KeyError, match="not among the 1 decoded videos"):
        cache(source[1], picks)
    with pytest.raises(ValueError, match="expected values in"):
        cache(copy, lambda n: [n])


def test_a_second_build_over_unchanged_files_reuses_the_decoded_set(data_cfg, tmp_path):
    source = sorted(Path(data_cfg["root"]).glob("videos/train/*.mp4"))[:2]
    paths = [tmp_path / "a.mp4", tmp_path / "b.mp4"]
    for origin, path in zip(source, paths, strict=True):
        shutil.copy(origin, path)
    first = DecodedVideos.build(paths, progress=False)
    assert DecodedVideos.build(paths, progress=False) is first
    # A file rewritten in between (another size, another modification time) is decoded again.
    shutil.copy(source[1], paths[0])
    second = DecodedVideos.build(paths, progress=False)
    assert second is not first
    assert np.array_equal(second.frames[paths[0]], second.frames[paths[1]])
    assert not np.array_equal(first.frames[paths[0]], second.frames[paths[0]])
