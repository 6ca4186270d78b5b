"""Scale jitter, crops, flips and normalisation of the paper's video pipeline, on synthetic uint8 frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nlnet.data.transforms import (
    KINETICS_MEAN,
    KINETICS_STD,
    EvalViews,
    TrainAugment,
    crop_offsets,
    normalize,
    resize_short_side,
)


def column_coded(frames: int, height: int, width: int) -> torch.Tensor:
    """uint8 frames (T, H, W, 3): red = column, green = row, blue = frame index."""
    clip = np.zeros((frames, height, width, 3), np.uint8)
    clip[..., 0] = np.arange(width)[None, None, :]
    clip[..., 1] = np.arange(height)[None, :, None]
    clip[..., 2] = np.arange(frames)[:, None, None]
    return torch.from_numpy(clip)


def unnormalize(clip: torch.Tensor) -> torch.Tensor:
    """(3, T, H, W) normalised float -> (T, H, W, 3) pixel values (float)."""
    return (clip * KINETICS_STD + KINETICS_MEAN).permute(1, 2, 3, 0)


def test_kinetics_constants_are_mean_045_std_0225_on_unit_scale():
    assert KINETICS_MEAN / 255 == pytest.approx(0.45)
    assert KINETICS_STD / 255 == pytest.approx(0.225)


def test_normalize_matches_numpy_and_keeps_rgb_order():
    frames = torch.randint(0, 256, (4, 5, 6, 3), dtype=torch.uint8)
    clip = normalize(frames, KINETICS_MEAN, KINETICS_STD)
    expected = (frames.numpy().astype(np.float64) - 114.75) / 57.375
    assert clip.shape == (3, 4, 5, 6) and clip.dtype == torch.float32
    np.testing.assert_allclose(clip.numpy(), expected.transpose(3, 0, 1, 2), atol=1e-6)
    per_channel = normalize(frames, [10.0, 20.0, 30.0], [1.0, 2.0, 4.0])
    np.testing.assert_allclose(per_channel[2].numpy(), (frames[..., 2].numpy() - 30.0) / 4.0, atol=1e-6)
    with pytest.raises(ValueError, match="one number or 3"):
        normalize(frames, [1.0, 2.0], 1.0)
    with pytest.raises(ValueError, match="uint8 frames"):
        normalize(frames.float(), 0.0, 1.0)


@pytest.mark.parametrize(
    ("height", "width", "size", "expected"),
    [
        (240, 320, 256, (256, 341)),
        (320, 240, 256, (341, 256)),
        (48, 64, 32, (32, 43)),
        (32, 32, 40, (40, 40)),
    ],
)
def test_resize_short_side_keeps_aspect(height, width, size, expected):
    frames = torch.zeros((2, height, width, 3), dtype=torch.uint8)
    assert tuple(resize_short_side(frames, size).shape) == (2, *expected, 3)


def test_resize_matches_pillow_bilinear():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    ours = resize_short_side(torch.from_numpy(image)[None], 40)[0].numpy().astype(int)
    # Pillow's bilinear filter widens with the scale factor (antialiasing), like torchvision's antialias=True.
    reference = np.asarray(Image.fromarray(image).resize((60, 40), Image.BILINEAR)).astype(int)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= 1


def test_crop_offsets():
    assert crop_offsets(341, 256, 3) == [0, 42, 85]
    assert crop_offsets(341, 256, 1) == [42]
    assert crop_offsets(256, 256, 3) == [0, 0, 0]
    assert crop_offsets(100, 10, 4) == [0, 30, 60, 90]
    with pytest.raises(ValueError, match="does not fit"):
        crop_offsets(100, 101, 1)


def test_eval_views_are_start_centre_end_of_the_longer_side():
    frames = column_coded(3, 20, 50)  # landscape; shorter side already equals the scale: no resampling
    views = EvalViews(20, 20, 3)(frames)
    assert views.shape == (3, 3, 3, 20, 20)
    pixels = [unnormalize(view).round() for view in views]
    assert [int(p[0, 0, 0, 0]) for p in pixels] == [0, 15, 30]  # left column = red = x offset
    for p in pixels:
        assert torch.equal(p[:, :, 0, 1], torch.arange(20.0).expand(3, 20))  # full height, rows 0..19
        assert torch.equal(p[:, 0, 0, 2], torch.arange(3.0))  # frames in order

    portrait = column_coded(2, 50, 20)
    tops = [int(unnormalize(view).round()[0, 0, 0, 1]) for view in EvalViews(20, 20, 3)(portrait)]
    assert tops == [0, 15, 30]  # along the height this time

    centre = unnormalize(EvalViews(20, 10, 1)(column_coded(1, 20, 50))[0]).round()
    assert (int(centre[0, 0, 0, 0]), int(centre[0, 0, 0, 1])) == (20, 5)  # centred in both directions


def test_eval_views_reject_crop_larger_than_scale():
    with pytest.raises(ValueError, match="crop_size"):
        EvalViews(256, 300, 3)


def test_train_augment_is_a_function_of_the_generator_seed():
    frames = torch.randint(0, 256, (4, 48, 64, 3), dtype=torch.uint8)
    augment = TrainAugment((32, 40), 28)
    first = augment(frames, np.random.default_rng(7))
    again = augment(frames, np.random.default_rng(7))
    assert first.shape == (3, 4, 28, 28)
    assert torch.equal(first, again)
    others = [augment(frames, np.random.default_rng(seed)) for seed in range(8)]
    assert sum(not torch.equal(first, other) for other in others) >= 7


def test_train_crop_lies_inside_the_rescaled_frame_and_flip_mirrors():
    frames = column_coded(2, 32, 48)
    no_flip = TrainAugment((32, 32), 16, flip_prob=0.0)
    always_flip = TrainAugment((32, 32), 16, flip_prob=1.0)
    lefts = set()
    for seed in range(40):
        kept = unnormalize(no_flip(frames, np.random.default_rng(seed))).round()
        columns = kept[0, 0, :, 0]
        assert torch.equal(columns, columns[0] + torch.arange(16.0))  # a contiguous window
        assert 0 <= columns[0] <= 48 - 16
        lefts.add(int(columns[0]))
        flipped = unnormalize(always_flip(frames, np.random.default_rng(seed))).round()
        assert torch.equal(flipped, kept.flip(2))  # same draws, mirrored
    assert len(lefts) > 10  # the crop position really varies


def test_train_scale_jitter_draws_every_integer_in_the_inclusive_range():
    ramp = np.zeros((1, 20, 20, 3), np.uint8)
    ramp[..., 0] = 6 * np.arange(20)  # red rises by 6 per column; after resizing to s it rises by 6 * 20 / s
    augment = TrainAugment((20, 40), 20, flip_prob=0.0)
    drawn = set()
    for seed in range(300):
        red = unnormalize(augment(torch.from_numpy(ramp), np.random.default_rng(seed)))[0, 0, :, 0]
        slope = float(red[18] - red[1]) / 17  # columns 1..18 stay clear of the clamped borders
        scale = int(np.random.default_rng(seed).integers(20, 41))  # the first draw is the scale
        drawn.add(scale)
        # The crop is cut from a window of whole source pixels resized to a whole number of pixels, so the
        # scale it shows is the drawn one to within scale / (2 * crop) (here under 1), plus the error of reading
        # it off an antialiased ramp.
        assert abs(6 * 20 / slope - scale) <= scale / (2 * 20) + 0.3
    assert drawn == set(range(20, 41))
    with pytest.raises(ValueError, match="crop_size"):
        TrainAugment((20, 30), 24)
    with pytest.raises(ValueError, match="jitter_scales"):
        TrainAugment((30, 20), 16)


def test_eval_views_of_several_clips_are_clip_major():
    frames = column_coded(6, 20, 30)  # two clips of 3 frames; blue = frame index
    views = EvalViews(20, 20, 2)(frames, num_clips=2)
    assert views.shape == (4, 3, 3, 20, 20)
    pixels = [unnormalize(view).round() for view in views]
    assert [(int(p[0, 0, 0, 0]), int(p[0, 0, 0, 2])) for p in pixels] == [(0, 0), (10, 0), (0, 3), (10, 3)]
    with pytest.raises(ValueError, match="equal length"):
        EvalViews(20, 20, 2)(frames, num_clips=4)
