"""Crop-before-resize training augmentation, and the same augmentation run batched on the training device.

On the CPU (the device here) the device path must give the worker path's pixels exactly: both cut the same
source window with the same uint8 kernel. On CUDA torchvision resizes uint8 through float, so the two paths may
differ by one grey level there (not testable on this machine).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from nlnet.data import VideoClipDataset, VideoRecord, build_loader, collate_clips
from nlnet.data.transforms import TrainAugment, normalize_clips


def smooth_frames(frames: int, height: int, width: int, seed: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) of smooth random content (low-frequency noise upsampled), different per frame."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand((frames, 3, height // 8 + 1, width // 8 + 1), generator=generator) * 255
    fine = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return fine.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def test_crop_before_resize_matches_resize_then_crop_up_to_interpolation():
    # Today's order (resize the whole frame to the drawn scale, then crop) against cutting the window first:
    # the same draws, so the same region of the picture, within interpolation differences.
    frames = smooth_frames(4, 120, 160, seed=0)
    augment = TrainAugment((128, 160), 112, normalized=False, flip_prob=0.5)
    for seed in range(12):
        got = augment(frames, np.random.default_rng(seed)).float()  # (3, T, S, S)
        rng = np.random.default_rng(seed)
        scale = int(rng.integers(128, 161))
        resized = TF.resize(frames.permute(0, 3, 1, 2), [scale, round(160 * scale / 120)], antialias=True)
        top = int(rng.integers(0, resized.shape[2] - 112 + 1))
        left = int(rng.integers(0, resized.shape[3] - 112 + 1))
        flip = rng.random() < 0.5
        shift = 2 if left + 2 <= resized.shape[3] - 112 else -2

        def crop(dx, top=top, left=left, resized=resized, flip=flip):
            window = resized[:, :, top : top + 112, left + dx : left + dx + 112]
            return (window.flip(-1) if flip else window).transpose(0, 1).float()

        difference = (got - crop(0)).abs().mean()
        # Sub-pixel differences only: well under what a crop two pixels off gives.
        assert difference < 0.5 * (got - crop(shift)).abs().mean(), (seed, difference)


def test_device_path_gives_the_worker_path_pixels(tmp_path, make_video):
    # Videos of two sizes and aspect ratios in one batch: the device side pads them and must not read the padding.
    paths = []
    for index, (height, width) in enumerate([(48, 64), (64, 48), (48, 80), (48, 64)]):
        content = smooth_frames(20, height, width, seed=index).numpy()
        paths.append(make_video(tmp_path / f"v{index}.mp4", 20, height, width, content=content))
    records = [VideoRecord(path, (0,)) for path in paths]
    common = dict(num_classes=1, num_frames=4, sampling_rate=3, jitter_scales=(48, 60), train_crop=40, seed=5)
    worker = VideoClipDataset(records, normalized=False, **common)
    device = VideoClipDataset(records, normalized=False, augment_on="device", **common)

    items = [device[i] for i in range(len(records))]
    assert items[1]["clip"].shape == (4, 64, 48, 3) and items[1]["window"].shape == (9,)
    batch = collate_clips(items)
    assert batch["clip"].shape == (4, 4, 64, 80, 3)  # padded to the largest height and width
    expected = normalize_clips(collate_clips([worker[i] for i in range(len(records))])["clip"], 114.75, 57.375)
    got = device.model_input(batch, torch.device("cpu"))
    assert got.shape == (4, 3, 4, 40, 40) and got.dtype == torch.float32
    assert torch.equal(got, expected)

    # Through loaders with two workers and a new epoch: the same draws whatever the path.
    for dataset in (worker, device):
        dataset.set_epoch(3)
    loaded = {}
    for name, dataset in (("worker", worker), ("device", device)):
        loader = build_loader(dataset, 2, shuffle=True, num_workers=2, seed=9, drop_last=False)
        loaded[name] = [(batch["index"], dataset.model_input(batch, torch.device("cpu"))) for batch in loader]
    for (index_w, clips_w), (index_d, clips_d) in zip(loaded["worker"], loaded["device"], strict=True):
        assert torch.equal(index_w, index_d) and torch.equal(clips_w, clips_d)


def test_augment_on_is_checked(tmp_path, make_video):
    records = [VideoRecord(make_video(tmp_path / "v.mp4", 12, 32, 40), (0,))]
    common = dict(num_classes=1, num_frames=2, sampling_rate=2, jitter_scales=(32, 36), train_crop=32)
    with pytest.raises(ValueError, match=r"augment_on must be one of \('worker', 'device'\), got 'gpu'"):
        VideoClipDataset(records, augment_on="gpu", **common)


@pytest.mark.parametrize("mode", ["test", "center"])
def test_test_views_cut_on_the_device_equal_the_workers(tmp_path, make_video, mode):
    paths = []
    for index, (height, width) in enumerate([(48, 64), (64, 48), (40, 60)]):
        content = smooth_frames(24, height, width, seed=10 + index).numpy()
        paths.append(make_video(tmp_path / f"v{index}.mp4", 24, height, width, content=content))
    records = [VideoRecord(path, (0,)) for path in paths]
    common = dict(num_classes=1, num_frames=4, sampling_rate=2, mode=mode, test_scale=36, test_crop=32, num_clips=3)
    worker = VideoClipDataset(records, normalized=False, **common)
    device = VideoClipDataset(records, normalized=False, augment_on="device", **common)
    batch = collate_clips([device[i] for i in range(3)])
    assert batch["frame_size"].tolist() == [[48, 64], [64, 48], [40, 60]] and batch["window"] is None
    expected = collate_clips([worker[i] for i in range(3)])["clip"]
    got = device.to_device(batch, torch.device("cpu"))
    assert got.dtype == torch.uint8 and got.shape == expected.shape
    assert expected.shape == ((3, 9, 3, 4, 32, 32) if mode == "test" else (3, 3, 4, 32, 32))
    assert torch.equal(got, expected)
    assert torch.equal(device.model_input(batch, torch.device("cpu")), normalize_clips(expected, 114.75, 57.375))
