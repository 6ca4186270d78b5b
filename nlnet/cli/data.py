"""Data commands: ``data prepare`` re-encodes a video collection for fast training reads."""

from __future__ import annotations

import argparse
import os
from fractions import Fraction

from nlnet.cli.common import _Subparsers


def _add_data(subparsers: _Subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "data", parents=[common], help="prepare video data sets", description="Video data set tools."
    )
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    prepare = commands.add_parser(
        "prepare",
        parents=[common],
        help="re-encode videos to H.264 mp4: short side resized, a key frame every k frames",
        description="Re-encode a folder of videos (recursively; class folders are kept) or an annotation list "
        "(path_csv or kinetics_csv) into DST, like ffmpeg -vf scale=-2:256 -g 16. Outputs already in DST are "
        "skipped, so a stopped run resumes; unreadable videos are listed in DST/failed.txt; DST/prepared.csv "
        "lists the outputs as path,label.",
    )
    prepare.add_argument("src", metavar="SRC", help="a folder of videos or an annotation list")
    prepare.add_argument("dst", metavar="DST", help="output folder")
    prepare.add_argument(
        "--format", choices=("path_csv", "kinetics_csv"), help="list format (default: from its header)"
    )
    prepare.add_argument("--root", help="folder the list's video paths are relative to (default: the list's folder)")
    prepare.add_argument("--short-side", type=int, default=256, help="size of the shorter side, even (default 256)")
    prepare.add_argument("--keyframe-interval", type=int, default=32, help="frames between key frames (default 32)")
    prepare.add_argument(
        "--bframes",
        type=int,
        default=7,
        help="non-reference B-frames between reference frames, which a clip's decoder skips when it does not "
        "show them (default 7; 0: every frame a reference)",
    )
    prepare.add_argument(
        "--fps", type=_fps, default=None, metavar="KEEP|N", help="keep every frame (default) or resample to N fps"
    )
    prepare.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="encoding processes (default: one per CPU)"
    )
    prepare.set_defaults(func=_prepare)


def _fps(text: str) -> Fraction | None:
    if text.lower() == "keep":
        return None
    try:
        # Fraction reads 29.97 and 30000/1001 alike.
        rate = Fraction(text)
    except ValueError:
        rate = Fraction(0)
    if rate <= 0:
        raise argparse.ArgumentTypeError(f"expected KEEP or a positive frame rate, got {text!r}")
    return rate


def _prepare(args: argparse.Namespace) -> int:
    from nlnet.data.prepare import prepare_videos

    result = prepare_videos(
        args.src,
        args.dst,
        format=args.format,
        root=args.root,
        short_side=args.short_side,
        keyframe_interval=args.keyframe_interval,
        bframes=args.bframes,
        fps=args.fps,
        workers=args.workers,
    )
    print(f"{len(result.written)} videos written, {len(result.skipped)} already there, {len(result.failed)} failed")
    for source, reason in result.failed:
        print(f"  failed: {source}: {reason}")
    print(f"annotations: {result.annotations}")
    return 0
