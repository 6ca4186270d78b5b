"""``nlnet visualize``: what a non-local block attends to (PNG/GIF), or query dependence."""

from __future__ import annotations

import argparse
import json

from nlnet.cli.common import _Subparsers


def _add_visualize(subparsers: _Subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "visualize",
        parents=[common],
        help="draw what a non-local block attends to (PNG/GIF), or measure query dependence (GCNet)",
        description="Reads a test clip of VIDEO (or IMAGE, for a detection checkpoint) as the test protocol "
        "does, runs the model and draws where one query position's block looks: a heat map or the paper's "
        "arrows to the top-k keys. --query-dependence prints GCNet's mean cosine distance between the "
        "attention maps of different queries, per block. Overrides are dotted KEY=VALUE pairs of the recipe.",
    )
    parser.add_argument("--checkpoint", help="nlnet checkpoint (or converted official model); omit: untrained")
    parser.add_argument("--config", help="recipe name or YAML file (default: the one the checkpoint was trained with)")
    parser.add_argument("--model", help="model name (model.name), e.g. nl_i3d_r50 or maskrcnn_r50_fpn")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--video", help="video file (default: the first video of the recipe's test split)")
    source.add_argument("--image", help="image file (detection checkpoints)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--query", metavar="T,Y,X", help="query frame and pixel on the shown crop (Y,X: image)")
    where.add_argument(
        "--auto",
        nargs="?",
        const="motion",
        choices=("motion", "attended"),
        help="pick the query: where the clip moves most (default) or the most attended place",
    )
    parser.add_argument("--block", help="block name, e.g. res4.5.nonlocal_block (default: the last one)")
    parser.add_argument(
        "--style", choices=("heatmap", "arrows"), help="PNG drawing (default: heatmap; arrows with --builtin)"
    )
    parser.add_argument("--top-k", type=int, default=5, help="strongest keys marked (default 5)")
    parser.add_argument("--clip-index", type=int, default=0, help="which of --num-clips test clips (default 0)")
    parser.add_argument("--num-clips", type=int, default=1, help="test clips spread over the video (default 1)")
    parser.add_argument("--fps", type=float, default=4.0, help="GIF frame rate")
    parser.add_argument("--gif-scale", type=int, default=1, help="GIF enlargement factor")
    parser.add_argument("--query-dependence", action="store_true", help="print GCNet's measure per block")
    parser.add_argument(
        "--builtin",
        action="store_true",
        help="checkpoint trained on the built-in set: query at the colour cue, report how often the top key "
        "lies on the object the label depends on, draw the first clip where it does",
    )
    parser.add_argument("--max-clips", type=int, default=200, help="--builtin: test clips examined")
    parser.add_argument("--num-queries", type=int, default=64, help="queries sampled per block and clip")
    parser.add_argument("--out", help="FILE.png or FILE.gif (figure); FILE.json (--query-dependence)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")

    parser.set_defaults(func=_visualize)


def _visualize(args: argparse.Namespace) -> int:
    if args.query_dependence:
        return _print_query_dependence(args)
    if not args.out:
        raise ValueError("--out FILE.png|FILE.gif is required to draw a figure")
    if args.builtin:
        return _draw_builtin_attention(args)
    return _draw_attention(args)


def _print_query_dependence(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nlnet.viz import measure_query_dependence

    distances = measure_query_dependence(
        args.checkpoint,
        args.video or args.image,
        block=args.block,
        num_clips=args.num_clips,
        num_queries=args.num_queries,
        config=args.config,
        model_name=args.model,
        overrides=args.overrides,
    )
    width = max(len(name) for name in distances)
    print(f"{'block':<{width}}  mean cosine distance between queries")
    for name, distance in distances.items():
        print(f"{name:<{width}}  {distance:.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(distances, indent=2) + "\n", encoding="utf-8")
    return 0


def _draw_builtin_attention(args: argparse.Namespace) -> int:
    from nlnet.viz import builtin_attention_figure

    if args.checkpoint is None:
        raise ValueError("--builtin needs the --checkpoint of a model trained on the built-in set")
    report = builtin_attention_figure(
        args.checkpoint,
        args.out,
        block=args.block,
        max_clips=args.max_clips,
        style=args.style or "arrows",
        top_k=args.top_k,
        config=args.config,
        overrides=args.overrides,
    )
    print(
        f"{report.block}: a query on the cue gives the object of its colour more attention than any other object "
        f"on {report.object_choice:.1%} of the {report.multi_object_clips} test clips with several objects (an "
        f"object at random: {report.object_chance:.1%}); over all {report.clips} clips its top key lies on that "
        f"object in {report.on_target:.1%} (a random key: {report.chance:.1%}); accuracy {report.accuracy:.1%}"
    )
    print(f"wrote {args.out} (test clip {report.figure_index}, {report.figure_objects} objects)")
    return 0


def _draw_attention(args: argparse.Namespace) -> int:
    from nlnet.viz import save_attention_figure

    query = None
    if args.query is not None:
        try:
            query = tuple(float(v) for v in args.query.split(","))
        except ValueError:
            raise ValueError(f"--query must be T,Y,X (or Y,X for an image), got {args.query!r}") from None
    amap = save_attention_figure(
        args.checkpoint,
        args.video or args.image,
        args.out,
        query=query,
        auto=args.auto or "motion",
        block=args.block,
        style=args.style or "heatmap",
        top_k=args.top_k,
        clip_index=args.clip_index,
        num_clips=args.num_clips,
        fps=args.fps,
        gif_scale=args.gif_scale,
        config=args.config,
        model_name=args.model,
        overrides=args.overrides,
    )
    t, y, x = amap.query
    print(f"{amap.block}: query (t, y, x) = ({t:g}, {y:g}, {x:g}) on frames {amap.frame_size}")
    for rank, (weight, (kt, ky, kx)) in enumerate(amap.top_keys(args.top_k), start=1):
        print(f"  {rank}. weight {weight:.4g} at (t, y, x) = ({kt:.1f}, {ky:.1f}, {kx:.1f})")
    print(f"wrote {args.out}")
    return 0
