"""The clip dataset, build_dataset, collate and loaders, end to end on real mp4 files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from nlnet.data import (
    VideoClipDataset,
    VideoRecord,
    build_dataset,
    build_loader,
    collate_clips,
    read_annotations,
)
from nlnet.data.transforms import KINETICS_MEAN, KINETICS_STD

SMALL = dict(
    num_frames=4,
    sampling_rate=2,
    jitter_scales=(32, 40),
    train_crop=28,
    test_scale=32,
    test_crop=32,
    num_clips=3,
    num_crops=3,
)


def frame_indices(clip: torch.Tensor, decode_index) -> list[int]:
    """Frame indices encoded in a normalised clip (3, T, H, W) of index-coded video."""
    pixels = (clip * KINETICS_STD + KINETICS_MEAN).permute(1, 2, 3, 0).clamp(0, 255).round().to(torch.uint8)
    return [decode_index(frame.numpy()) for frame in pixels]


@pytest.fixture(scope="module")
def videos(tmp_path_factory, make_video) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("videos")
    return {
        "long": make_video(folder / "long.mp4", 20, 48, 64),
        "short": make_video(folder / "short.mp4", 6, 48, 64),
        "tall": make_video(folder / "tall.mp4", 8, 64, 48),
    }


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_charades_multi_hot(tmp_path, make_video):
    video = make_video(tmp_path / "46GP8.mp4", 8, 32, 32)
    path = write(
        tmp_path / "Charades_v1_train.csv",
        "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"
        '46GP8,HR43,Kitchen,6,7,Yes,"A person cooks, then eats.",food;stove,"Cooks.",'
        "c092 11.90 21.20;c147 0.00 12.60;c092 30.00 31.00,24.83\n"
        'N11GT,0KZ7,Stairs,6,7,Yes,"Walks up.",stairs,"Walks.",,12.00\n',
    )
    records = read_annotations(path, "charades", tmp_path, 157)
    assert records == [VideoRecord(video, (92, 147)), VideoRecord(tmp_path / "N11GT.mp4", ())]
    dataset = VideoClipDataset(records, num_classes=157, multi_label=True, mode="center", **SMALL)
    item = dataset[0]
    assert item["label"].dtype == torch.float32 and item["label"].shape == (157,)
    assert item["label"].nonzero().flatten().tolist() == [92, 147]
    with pytest.raises(ValueError, match="single-label"):
        VideoClipDataset(records, num_classes=157, multi_label=False, **SMALL)


# ---------------------------------------------------------------------------------------------------- items


def test_train_items_follow_the_official_sampling(videos, decode_index):
    records = [VideoRecord(videos["long"], (1,)), VideoRecord(videos["short"], (0,))]
    dataset = VideoClipDataset(records, num_classes=2, mode="train", **SMALL)
    starts = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        item = dataset[0]
        assert item["clip"].shape == (3, 4, 28, 28) and item["clip"].dtype == torch.float32
        assert item["label"].dtype == torch.int64 and item["label"].shape == () and int(item["label"]) == 1
        assert item["index"] == 0
        indices = frame_indices(item["clip"], decode_index)
        assert indices == [indices[0] + 2 * i for i in range(4)] and 0 <= indices[0] <= 20 - 8
        starts.add(indices[0])
        # 6 frames < 4 * 2: start 0 and wrap-around, whatever the epoch
        assert frame_indices(dataset[1]["clip"], decode_index) == [0, 2, 4, 0]
    assert len(starts) > 1


def test_augmentation_is_a_function_of_seed_epoch_and_index(videos):
    records = [VideoRecord(videos["long"], (0,))] * 2
    dataset = VideoClipDataset(records, num_classes=1, seed=3, **SMALL)
    first = dataset[0]["clip"]
    assert torch.equal(first, dataset[0]["clip"])
    assert torch.equal(first, VideoClipDataset(records, num_classes=1, seed=3, **SMALL)[0]["clip"])
    assert not torch.equal(first, dataset[1]["clip"])  # same video, other index
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[0]["clip"])
    dataset.set_epoch(0)
    dataset.set_seed(4)
    assert not torch.equal(first, dataset[0]["clip"])


def test_center_item_is_the_middle_clip(videos, decode_index):
    dataset = VideoClipDataset([VideoRecord(videos["long"], (0,))], num_classes=1, mode="center", **SMALL)
    item = dataset[0]
    assert item["clip"].shape == (3, 4, 32, 32)
    assert frame_indices(item["clip"], decode_index) == [6, 8, 10, 12]


def test_test_views_shape_order_and_clip_starts(videos, decode_index):
    records = [VideoRecord(videos["long"], (0,)), VideoRecord(videos["tall"], (0,))]
    dataset = VideoClipDataset(records, num_classes=1, mode="test", **SMALL)
    assert dataset.num_views == 9
    item = dataset[0]
    assert item["clip"].shape == (9, 3, 4, 32, 32)
    # clip k of 3 starts at floor(k * 20 / 3) = 0, 6, 13; views are clip-major, 3 crops each
    expected = [[0, 2, 4, 6], [6, 8, 10, 12], [13, 15, 17, 19]]
    assert [frame_indices(view, decode_index) for view in item["clip"]] == [c for c in expected for _ in range(3)]
    tall = dataset[1]["clip"]  # 8 frames: starts 0, 2, 5, wrapping past the end
    assert tall.shape == (9, 3, 4, 32, 32)
    assert frame_indices(tall[6], decode_index) == [5, 7, 1, 3]
    single = VideoClipDataset(records, num_classes=1, mode="test", **{**SMALL, "num_clips": 1, "num_crops": 1})
    assert single[0]["clip"].shape == (1, 3, 4, 32, 32)


def test_rgb_channel_order_from_a_red_video(tmp_path, make_video):
    red = np.zeros((48, 64, 3), np.uint8)
    red[..., 0] = 220
    path = make_video(tmp_path / "red.mp4", 8, 48, 64, content=lambda index: red)
    clip = VideoClipDataset([VideoRecord(path, (0,))], num_classes=1, mode="center", **SMALL)[0]["clip"]
    means = clip.mean(dim=(1, 2, 3)) * KINETICS_STD + KINETICS_MEAN
    assert means[0] == pytest.approx(220, abs=4)
    assert means[1] < 10 and means[2] < 10


def test_missing_truncated_and_broken_videos_are_skipped_and_reported(tmp_path, videos, caplog):
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(videos["long"].read_bytes()[:1500])
    broken = tmp_path / "broken.mp4"
    broken.write_text("no video here")
    records = [
        VideoRecord(videos["long"], (1,)),
        VideoRecord(tmp_path / "missing.mp4", (0,)),
        VideoRecord(cut, (0,)),
        VideoRecord(broken, (0,)),
    ]
    dataset = VideoClipDataset(records, num_classes=2, **SMALL)
    with caplog.at_level(logging.WARNING, logger="nlnet.data.datasets"):
        items = [dataset[i] for i in range(4)]
    for index, path in [(1, "missing.mp4"), (2, "cut.mp4"), (3, "broken.mp4")]:
        error = items[index].pop("error")
        assert items[index] == {"skipped": str(tmp_path / path), "index": index}
        assert error and error in caplog.text
        assert str(tmp_path / path) in caplog.text
    batch = collate_clips(items)
    assert batch["clip"].shape == (1, 3, 4, 28, 28)
    assert batch["label"].tolist() == [1] and batch["index"].tolist() == [0]
    assert batch["skipped"] == [str(tmp_path / name) for name in ("missing.mp4", "cut.mp4", "broken.mp4")]
    empty = collate_clips(items[1:])
    assert empty["clip"] is None and empty["label"] is None and empty["index"].tolist() == []


def test_bigbuckbunny_through_the_test_protocol(bigbuckbunny):
    records = [VideoRecord(bigbuckbunny, (0,))]
    settings = {**SMALL, "num_frames": 2, "sampling_rate": 16, "num_clips": 2, "test_scale": 64, "test_crop": 64}
    views = VideoClipDataset(records, num_classes=1, mode="test", **settings)[0]["clip"]
    assert views.shape == (6, 3, 2, 64, 64)
    pixels = views * KINETICS_STD + KINETICS_MEAN
    assert pixels.min() >= -0.5 and pixels.max() <= 255.5
    # 1280x720 -> 114x64: the three crops sit at x = 0, 25, 50 and see different parts of the frame
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])
    assert torch.equal(views[0, :, :, :, 25:], views[1, :, :, :, :39])  # overlap of crops 0 and 1


# ------------------------------------------------------------------------------------------ build and load


def test_build_dataset_from_an_omegaconf_config(tmp_path, make_video):
    for split, count in (("train", 2), ("val", 1)):
        for label in ("dog", "cat"):
            for k in range(count):
                make_video(tmp_path / split / label / f"{k}.mp4", 6, 32, 48)
    cfg = OmegaConf.create(
        {
            "format": "folder",
            "root": str(tmp_path),
            "num_classes": 2,
            "num_frames": 4,
            "sampling_rate": 1,
            "train_jitter_scales": [32, 36],
            "train_crop": 28,
            "test_scale": 32,
            "test_crop": 32,
            "test_clips": 2,
            "test_crops": 3,
            "batch_size": 4,  # keys of other sections are ignored
        }
    )
    train = build_dataset(cfg, "train")
    assert len(train) == 4 and train.mode == "train" and train.class_names == ["cat", "dog"]
    assert [r.labels[0] for r in train.records] == [0, 0, 1, 1]
    assert train[0]["clip"].shape == (3, 4, 28, 28)
    val = build_dataset(cfg, "val")
    assert val.mode == "center" and len(val) == 2 and val[0]["clip"].shape == (3, 4, 32, 32)
    assert build_dataset({**OmegaConf.to_container(cfg), "val_mode": "train_like"}, "val").mode == "train"
    with pytest.raises(FileNotFoundError, match="test"):
        build_dataset(cfg, "test")  # root has split folders but no test folder
    flat = tmp_path / "flat"
    for label in ("b", "a"):
        make_video(flat / label / "0.mp4", 6, 32, 48)
    test = build_dataset({**OmegaConf.to_container(cfg), "root": str(flat)}, "test")  # no split folders
    assert test.class_names == ["a", "b"] and [r.labels for r in test.records] == [(0,), (1,)]
    assert test[0]["clip"].shape == (6, 3, 4, 32, 32)
    with pytest.raises(ValueError, match="val_mode"):
        build_dataset({**OmegaConf.to_container(cfg), "val_mode": "random"}, "val")
    with pytest.raises(ValueError, match="val_list"):
        build_dataset({**OmegaConf.to_container(cfg), "format": "path_csv"}, "val")


def test_build_dataset_kinetics_uses_training_class_names_for_val(tmp_path, make_video):
    make_video(tmp_path / "v_000000_000010.mp4", 6, 32, 32)
    train = write(tmp_path / "train.csv", "label,youtube_id,time_start,time_end\nb,v,0,10\na,v,0,10\nc,v,0,10\n")
    val = write(tmp_path / "val.csv", "label,youtube_id,time_start,time_end\nc,v,0,10\n")
    cfg = {"format": "kinetics_csv", "root": str(tmp_path), "train_list": str(train), "val_list": str(val)}
    cfg.update(num_classes=3, num_frames=2, sampling_rate=1, test_scale=32, test_crop=32)
    dataset = build_dataset(cfg, "val")
    assert dataset.class_names == ["a", "b", "c"]
    assert int(dataset[0]["label"]) == 2  # 'c' is class 2 of the training list, not class 0 of the val list


def test_loader_with_persistent_workers_matches_in_process_loading_and_reports_skips(videos, tmp_path):
    records = [VideoRecord(videos["long"], (1,)), VideoRecord(tmp_path / "gone.mp4", (0,))] * 3

    def run(num_workers: int, epochs: range) -> list[list[dict]]:
        dataset = VideoClipDataset(records, num_classes=2, **SMALL)
        loader = build_loader(dataset, 2, shuffle=True, num_workers=num_workers, seed=5, drop_last=False)
        assert dataset.seed == 5
        out = []
        for epoch in epochs:
            dataset.set_epoch(epoch)  # persistent workers must see it
            out.append(list(loader))
        return out

    in_process, in_workers = run(0, range(2)), run(2, range(2))
    for batches, other in zip(in_process, in_workers, strict=True):
        assert len(batches) == 3
        assert sorted(i for b in batches for i in b["index"].tolist()) == [0, 2, 4]
        assert [path for b in batches for path in b["skipped"]] == [str(tmp_path / "gone.mp4")] * 3
        for mine, theirs in zip(batches, other, strict=True):
            assert torch.equal(mine["index"], theirs["index"]) and mine["skipped"] == theirs["skipped"]
            assert (mine["clip"] is None) == (theirs["clip"] is None)
            if mine["clip"] is not None:
                assert torch.equal(mine["clip"], theirs["clip"])
    first = {int(i): b["clip"][k] for b in in_process[0] for k, i in enumerate(b["index"])}
    second = {int(i): b["clip"][k] for b in in_process[1] for k, i in enumerate(b["index"])}
    assert any(not torch.equal(first[i], second[i]) for i in (0, 2, 4))  # the epoch changes the augmentation


def test_shuffle_order_depends_on_seed_and_epoch_only():
    records = [VideoRecord(Path(f"/nonexistent/{i}.mp4"), (0,)) for i in range(8)]

    def order(seed: int, epoch: int) -> list[int]:
        dataset = VideoClipDataset(records, num_classes=1, **SMALL)
        loader = build_loader(dataset, 8, shuffle=True, num_workers=0, seed=seed, drop_last=False)
        dataset.set_epoch(epoch)
        return [int(item["index"]) for item in (dataset[i] for i in loader.sampler)]

    orders = [order(0, epoch) for epoch in range(4)]
    assert all(sorted(o) == list(range(8)) for o in orders)
    assert len({tuple(o) for o in orders}) > 1
    assert order(0, 2) == orders[2]  # a fresh loader resumed at epoch 2 sees the same order
    assert order(1, 2) != orders[2]
    plain = build_loader(
        VideoClipDataset(records, num_classes=1, **SMALL), 3, shuffle=False, num_workers=0, drop_last=True
    )
    assert [b["skipped"] for b in plain] == [[f"/nonexistent/{i}.mp4" for i in range(k, k + 3)] for k in (0, 3)]
    with pytest.raises(ValueError, match="sampler"):
        build_loader(plain.dataset, 2, shuffle=True, num_workers=0, sampler=range(8), drop_last=False)
