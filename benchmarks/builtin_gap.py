"""How much a non-local block helps on the built-in data: a small C2D with and without it, same budget, seeds.

The data is `nlnet.data.builtin` (the label is the shape of the object that wears the colour of a cue shown
earlier; see that module). Both networks are ``nlnet.models.create("c2d_r50", ...)`` with the same small
settings (one bottleneck per stage, ``--width`` stem channels, 8x8 clip format so time is only halved by
pool2); the second adds one non-local block after the chosen stage's block, without sub-sampling of the keys.
Each seed fixes the initial weights and the batch order of both networks; the data (training and held-out test
streams of ``--data-seed``) is the same for all runs. For each seed the two networks train one after the other,
so that the load of other processes hits both alike.

``--source memory`` trains on arrays from `generate_clips`; ``--source mp4`` writes the mp4 files with
`write_builtin` and decodes every clip once with PyAV (`nlnet.data.video.decode_frames`), so the numbers come
through real H.264 compression. Frames are normalised with the Kinetics mean and std of `nlnet.data`.

Run ``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/builtin_gap.py`` (prints one line per epoch and a summary
table with top-1 mean ± std over seeds, wall and CPU seconds per training run).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nlnet.data.builtin import SHAPES, BuiltinConfig, generate_clips, load_scenes, write_builtin
from nlnet.data.transforms import KINETICS_MEAN, KINETICS_STD
from nlnet.data.video import decode_frames
from nlnet.models import create


def load_split(args: argparse.Namespace, split: str, count: int, config: BuiltinConfig) -> tuple[torch.Tensor, ...]:
    """(clips (N, T, H, W, 3) uint8, labels (N,) int64, objects on screen (N,) int64) of one split."""
    if args.source == "memory":
        clips, labels, scenes = generate_clips(count, seed=args.data_seed, split=split, config=config)
    else:
        folder = write_builtin(
            args.cache, num_train=args.train_clips, num_test=args.test_clips, seed=args.data_seed, config=config
        )
        rows = (folder / f"{split}.csv").read_text().splitlines()[1:]
        clips = np.stack([decode_frames(folder / row.split(",")[0], np.arange)[0] for row in rows])
        labels = np.array([int(row.split(",")[1]) for row in rows], dtype=np.int64)
        scenes = load_scenes(folder, split)
    objects = torch.tensor([len(scene.objects) for scene in scenes])
    return torch.from_numpy(clips), torch.from_numpy(labels), objects


def normalise(clips: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> float32 (B, 3, T, H, W) with the Kinetics mean and std (kept uint8 until here)."""
    return clips.permute(0, 4, 1, 2, 3).float().sub_(KINETICS_MEAN).div_(KINETICS_STD)


def build(args: argparse.Namespace, with_nonlocal: bool) -> torch.nn.Module:
    return create(
        "c2d_r50",
        num_classes=len(SHAPES),
        stage_blocks=(1, 1, 1, 1),
        base_width=args.width,
        clip="8x8",
        nonlocal_blocks={args.stage: [0]} if with_nonlocal else None,
        nonlocal_mode=args.mode,
        nonlocal_pool=None,
        dropout=0.0,
    )


@torch.no_grad()
def accuracy(model: torch.nn.Module, clips: torch.Tensor, labels: torch.Tensor, objects: torch.Tensor) -> dict:
    """Top-1 overall ("all") and by the number of objects on screen (1, 2, ...)."""
    model.eval()
    predictions = torch.cat([model(normalise(clips[i : i + 256])).argmax(1) for i in range(0, len(labels), 256)])
    correct = (predictions == labels).float()
    by_count = {int(k): correct[objects == k].mean().item() for k in objects.unique()}
    return {"all": correct.mean().item(), **by_count}


def train_once(args: argparse.Namespace, seed: int, with_nonlocal: bool, data: dict) -> dict:
    torch.manual_seed(seed)
    model = build(args, with_nonlocal)
    clips, labels, _ = data["train"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(labels) / args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=args.warmup
    )
    order = torch.Generator().manual_seed(seed)
    wall, cpu = time.perf_counter(), time.process_time()
    for epoch in range(args.epochs):
        model.train()
        permutation = torch.randperm(len(labels), generator=order)
        total_loss = 0.0
        for start in range(0, len(labels), args.batch_size):
            batch = permutation[start : start + args.batch_size]
            loss = F.cross_entropy(model(normalise(clips[batch])), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
        if args.verbose:
            print(
                f"  {'NL ' if with_nonlocal else 'C2D'} seed {seed} epoch {epoch + 1}: "
                f"loss {total_loss / len(labels):.3f}, test top-1 {accuracy(model, *data['test'])['all']:.3f}",
                flush=True,
            )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"top1": accuracy(model, *data["test"]), "wall": wall, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=("memory", "mp4"), default="memory")
    parser.add_argument("--cache", type=Path, default=None, help="parent folder of the mp4 data (mp4 source)")
    parser.add_argument("--train-clips", type=int, default=8000)
    parser.add_argument("--test-clips", type=int, default=1000)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--min-objects", type=int, default=1)
    parser.add_argument("--max-objects", type=int, default=4)
    parser.add_argument("--width", type=int, default=8, help="base_width of the C2D")
    parser.add_argument("--stage", default="res4", help="stage whose block the non-local block follows")
    parser.add_argument("--mode", default="embedded_gaussian", help="non-local instantiation")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup", type=float, default=0.15, help="fraction of steps of the one-cycle ramp")
    parser.add_argument("--seeds", type=int, default=3, help="number of training seeds")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed + 1, ...")
    parser.add_argument("--verbose", action="store_true", help="test top-1 after every epoch")
    parser.add_argument("--models", choices=("both", "c2d", "nl"), default="both", help="networks to train")
    args = parser.parse_args()

    config = BuiltinConfig(size=args.size, min_objects=args.min_objects, max_objects=args.max_objects)
    start = time.perf_counter()
    data = {
        "train": load_split(args, "train", args.train_clips, config),
        "test": load_split(args, "test", args.test_clips, config),
    }
    print(f"data ({args.source}): {time.perf_counter() - start:.1f} s, {torch.get_num_threads()} threads", flush=True)

    chosen = {"both": ("c2d", "nl"), "c2d": ("c2d",), "nl": ("nl",)}[args.models]
    networks = [net for key, net in (("c2d", ("C2D", False)), ("nl", ("C2D + NL", True))) if key in chosen]
    results: dict[str, list[dict]] = {name: [] for name, _ in networks}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for name, with_nonlocal in networks:
            result = train_once(args, seed, with_nonlocal, data)
            results[name].append(result)
            print(
                f"{name} seed {seed}: top-1 {result['top1']['all']:.3f} ({result['wall']:.0f} s wall, "
                f"{result['cpu']:.0f} s CPU)",
                flush=True,
            )

    counts = sorted(key for key in next(iter(results.values()))[0]["top1"] if key != "all")
    print(
        f"\n| model | top-1 (mean ± std over {args.seeds} seeds) | per seed | "
        + " | ".join(f"{k} object{'s' * (k > 1)}" for k in counts)
        + " | wall s / run | CPU s / run |"
    )
    print("|---|---|---|" + "---|" * len(counts) + "---|---|")
    for name, runs in results.items():
        accuracies = [100 * run["top1"]["all"] for run in runs]
        by_count = [statistics.mean(100 * run["top1"][k] for run in runs) for k in counts]
        print(
            f"| {name} | {statistics.mean(accuracies):.1f} ± {statistics.pstdev(accuracies):.1f} | "
            f"{', '.join(f'{a:.1f}' for a in accuracies)} | " + " | ".join(f"{a:.1f}" for a in by_count) + " | "
            f"{statistics.median(r['wall'] for r in runs):.0f} | {statistics.median(r['cpu'] for r in runs):.0f} |"
        )


if __name__ == "__main__":
    main()
