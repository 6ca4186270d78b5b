"""The ``nlnet`` command line: argument parsing only; every command calls the Python API.

Each command has an ``_add_<name>`` function that declares its arguments and a ``_<name>`` function, the API
call it makes (``set_defaults(func=...)``); :func:`_build_parser` registers them. Heavy imports happen inside
the command functions so that ``nlnet --help`` stays instant.

Bad input (a missing file, an unknown recipe name, an invalid key or value) ends in one line on stderr and exit
status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

# What bad input raises across nlnet (missing files, recipe validation, unknown names): the message is the
# error report. Anything else is a bug and keeps its traceback.
_USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ValueError, KeyError)

_Subparsers = argparse._SubParsersAction


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _log_to_stderr() -> None:
    import logging

    if _is_main_rank():
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def _print_metrics(metrics: dict[str, Any], prefix: str = "") -> None:
    for name, value in metrics.items():
        print(f"{prefix}{name}: {value:.4f}" if isinstance(value, float) else f"{prefix}{name}: {value}")


def _print_skipped(videos: Sequence[str]) -> None:
    if videos:
        print(f"{len(videos)} unreadable videos skipped: " + ", ".join(videos))


def _recipe(args: argparse.Namespace) -> Any:
    """``--config`` if given, else the recipe the ``--checkpoint`` was trained with."""
    if args.config is not None:
        return args.config
    from nlnet.engine.config import recipe_of_checkpoint

    return recipe_of_checkpoint(args.checkpoint)


# ---------------------------------------------------------------------------------------------- video models


def _add_train(subparsers: _Subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "train",
        parents=[common],
        help="train a video model from a YAML recipe (torchrun --nproc_per_node=N -m nlnet train: DDP)",
        description="Train with the paper's recipe. Overrides are dotted KEY=VALUE pairs (train.max_iter=9).",
    )
    parser.add_argument(
        "--config",
        help="recipe: a shipped name (e.g. kinetics_nl_i3d_r50_32x2; see nlnet/configs) or a YAML file "
        "(default: builtin_nl_c2d, NL C2D on the built-in data set, generated on first use)",
    )
    parser.add_argument("--output-dir", help="where checkpoints and logs go (overrides output_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir's latest checkpoint")
    parser.add_argument("--resume-from", metavar="CKPT", help="continue from this checkpoint")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from nlnet.engine.builtin import DEFAULT_CONFIG
    from nlnet.engine.config import load_config
    from nlnet.engine.train import train

    _log_to_stderr()
    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    cfg = load_config(args.config or DEFAULT_CONFIG, overrides)
    result = train(cfg, resume=args.resume_from or args.resume, device=args.device)
    if _is_main_rank():
        print(f"finished at iteration {result['iteration']}: {result['checkpoint']}")
        _print_metrics(result["metrics"], prefix="val ")
        _print_skipped(result["skipped"])
    return 0


def _add_test(subparsers: _Subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "test",
        parents=[common],
        help="evaluate a checkpoint (10 clips x 3 crops, fully convolutional; or --single-view)",
        description="Evaluate a checkpoint on data.test_list and write per-video scores as JSON.",
    )
    parser.add_argument("--checkpoint", required=True, help="nlnet checkpoint or model state dict")
    parser.add_argument(
        "--config", help="recipe name or YAML file (default: the recipe the checkpoint was trained with)"
    )
    parser.add_argument("--single-view", action="store_true", help="one centre clip, centre crop per video")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="annotation list to use")
    parser.add_argument("--output", help="JSON of per-video scores (default: output_dir/test_<ckpt>.json)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.set_defaults(func=_test)


def _test(args: argparse.Namespace) -> int:
    from nlnet.engine.config import load_config
    from nlnet.engine.evaluate import test

    cfg = load_config(_recipe(args), args.overrides)
    result = test(
        cfg, args.checkpoint, single_view=args.single_view, split=args.split, output=args.output, device=args.device
    )
    if _is_main_rank():
        _print_metrics(result["metrics"])
        _print_skipped(result["skipped"])
        print(f"per-video scores: {result['output']}")
    return 0


def _add_predict(subparsers: _Subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "predict",
        parents=[common],
        help="classify your own videos with a checkpoint (its recipe's test protocol)",
        description="Print the top-k classes of each video (files, or every video in a folder) with the test "
        "protocol of the checkpoint's recipe: test_clips x test_crops views, fully convolutional, or one centre "
        "view with --single-view. Class names come from --classes, else the recipe, else Kinetics-400.",
    )
    parser.add_argument("--checkpoint", required=True, help="nlnet checkpoint or a `nlnet convert caffe2` file")
    parser.add_argument("videos", nargs="+", metavar="VIDEO_OR_FOLDER", help="video files and folders of videos")
    parser.add_argument("--top-k", type=int, default=5, help="classes listed per video (default 5)")
    parser.add_argument("--classes", help="file of class names, one a line, or 'kinetics400'")
    parser.add_argument("--single-view", action="store_true", help="one centre clip, centre crop per video")
    parser.add_argument("--config", help="recipe name or YAML file (default: the checkpoint's recipe)")
    parser.add_argument("--json", help="write the predictions, with every class's score, to this JSON file")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    from nlnet.engine.predict import predict

    result = predict(
        args.checkpoint,
        args.videos,
        top_k=args.top_k,
        classes=args.classes,
        single_view=args.single_view,
        config=args.config,
        output=args.json,
        device=args.device,
    )
    failed = 0
    for entry in result["videos"]:
        if "error" in entry:
            failed += 1
            print(f"{entry['video']}: unreadable: {entry['error']}")
            continue
        print(entry["video"])
        for rank, guess in enumerate(entry["top_k"], start=1):
            print(f"  {rank}. {guess['class']}  {guess['probability']:.4f}")
    if args.json:
        print(f"predictions: {args.json}")
    # Non-zero when a video could not be read, so that scripts notice; the others were still predicted.
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------- detection


def _add_detect(subparsers: _Subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "detect",
        help="Mask/Keypoint R-CNN with non-local blocks (paper §6): train, eval, cost",
        description="Detection with torchvision's Mask/Keypoint R-CNN and the paper's non-local blocks. Without "
        "--config the recipe is the built-in shapes set (generated on first use); eval takes the checkpoint's "
        "own recipe. Overrides are dotted KEY=VALUE.",
    )
    commands = parser.add_subparsers(dest="detect_command", required=True, metavar="SUBCOMMAND")
    train_parser = commands.add_parser(
        "train", parents=[common], help="train (and evaluate at the end); torchrun for DDP"
    )
    eval_parser = commands.add_parser("eval", parents=[common], help="COCOeval of a checkpoint on its recipe's val set")
    cost_parser = commands.add_parser(
        "cost", parents=[common], help="FLOPs and step time with vs without the non-local blocks"
    )
    for sub in (train_parser, eval_parser, cost_parser):
        sub.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
        sub.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    for sub in (train_parser, cost_parser):
        sub.add_argument("--config", help="recipe name or YAML file, e.g. detection/shapes_maskrcnn_r50")
    train_parser.add_argument("--resume", action="store_true", help="continue from output_dir's latest checkpoint")
    train_parser.set_defaults(func=_detect_train)
    eval_parser.add_argument("--checkpoint", required=True, help="nlnet checkpoint or torchvision state dict")
    eval_parser.add_argument(
        "--config", help="recipe name or YAML file (default: the recipe the checkpoint was trained with)"
    )
    eval_parser.add_argument("--output-dir", help="where detections_*.json and results.json go")
    eval_parser.set_defaults(func=_detect_eval)
    cost_parser.add_argument("--steps", type=int, default=5, help="timed training steps per model")
    cost_parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="FLOPs also at H x W")
    cost_parser.set_defaults(func=_detect_cost)


def _detect_train(args: argparse.Namespace) -> int:
    from nlnet.engine import detection

    _log_to_stderr()
    result = detection.train(detection.load_config(args.config, args.overrides), resume=args.resume, device=args.device)
    if _is_main_rank():
        print(f"finished at iteration {result['iteration']}: {result['checkpoint']}")
        print(f"median step time {result['step_time_s']:.3f} s; last losses {result['losses']}")
    return 0


def _detect_eval(args: argparse.Namespace) -> int:
    from nlnet.engine import detection

    _log_to_stderr()
    cfg = detection.load_config(_recipe(args), args.overrides)
    result = detection.evaluate_checkpoint(cfg, args.checkpoint, output_dir=args.output_dir, device=args.device)
    if _is_main_rank():
        for iou_type, stats in result["metrics"].items():
            print(f"{iou_type}: " + ", ".join(f"{k} {v:.4f}" for k, v in stats.items()))
    return 0


def _detect_cost(args: argparse.Namespace) -> int:
    import json

    from nlnet.engine import detection

    _log_to_stderr()
    cfg = detection.load_config(args.config, args.overrides)
    result = detection.measure_cost(cfg, steps=args.steps, image_size=args.image_size, device=args.device)
    print(json.dumps(result, indent=2))
    return 0


# ------------------------------------------------------------------------------------------- models, weights


def _add_info(subparsers: _Subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "info",
        parents=[common],
        help="parameters, multiply-adds and non-local block positions of a video model",
        description="Counts parameters and multiply-adds (FLOPs / 2, torch.utils.flop_counter) of one clip "
        "without computing anything. NAME 'all' prints a table of every model.",
    )
    parser.add_argument("name", metavar="NAME", help="a model name (see nlnet.models.available()) or 'all'")
    parser.add_argument("--input", default="3x32x224x224", metavar="CxTxHxW", help="clip shape, batch 1")
    parser.add_argument("--num-classes", type=int, default=400)
    parser.add_argument("--clip", choices=("32x2", "8x8"), default="32x2", help="stem variant")
    parser.add_argument("--nonlocal-blocks", help="override: 0, 1, 5, 10 or res2..res5")
    memory = parser.add_argument_group(
        "training memory", "--train-memory plans one training step per GPU on fake tensors (nothing allocated)"
    )
    memory.add_argument(
        "--train-memory",
        action="store_true",
        help="parameters + gradients + SGD momentum and activations, nlnet's blocks beside explicit N×M ones",
    )
    memory.add_argument("--batch", type=int, default=8, help="clips per GPU (default 8)")
    memory.add_argument("--size", type=int, default=224, help="crop height and width; --clip gives the frames")
    memory.add_argument("--amp", choices=("bf16",), help="plan under autocast to bfloat16 (default float32)")
    memory.add_argument("--gpu-memory", metavar="SIZE", help="e.g. 80GiB: also print the largest batch that fits")
    parser.set_defaults(func=_info)


def _info(args: argparse.Namespace) -> int:
    from nlnet.models import available, describe

    if args.train_memory:
        return _train_memory(args)
    try:
        shape = tuple(int(size) for size in args.input.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 4:
        raise ValueError(f"--input must look like 3x32x224x224, got {args.input!r}")
    overrides = {"clip": args.clip}
    if args.nonlocal_blocks is not None:
        overrides["nonlocal_blocks"] = args.nonlocal_blocks
    if args.name != "all":
        print(describe(args.name, args.num_classes, shape, **overrides).summary())
        return 0
    print(f"{'model':<16}{'params':>10}{'GMACs':>9}{'NL':>4}")
    for name in available("video"):
        info = describe(name, args.num_classes, shape, **overrides)
        print(f"{name:<16}{info.params / 1e6:>9.2f}M{info.macs / 1e9:>9.2f}{len(info.nonlocal_inputs):>4}")
    return 0


def _train_memory(args: argparse.Namespace) -> int:
    from nlnet.models.memory import training_memory

    if args.name == "all":
        raise ValueError("--train-memory plans one model; give its NAME, e.g. nl_i3d_r50")
    overrides = {} if args.nonlocal_blocks is None else {"nonlocal_blocks": args.nonlocal_blocks}
    plan = training_memory(
        args.name,
        args.batch,
        clip=args.clip,
        size=args.size,
        amp=args.amp,
        gpu_memory=args.gpu_memory,
        num_classes=args.num_classes,
        **overrides,
    )
    print(plan.summary())
    return 0


_IMPORT_SOURCES = ("caffe2", "mmaction2", "pyslowfast")


def _add_convert(subparsers: _Subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "convert",
        parents=[common],
        help="other frameworks' weights (Caffe2 .pkl, mmaction2 .pth, PySlowFast .pyth) -> nlnet .pt; export",
        description="nlnet convert caffe2 IN.pkl OUT.pt --model NAME   (official zoo; the pickle is read without "
        "running any code)\nnlnet convert mmaction2 IN.pth OUT.pt [--model NAME] [--nonlocal-mode MODE]\n"
        "nlnet convert pyslowfast IN.pyth OUT.pt [--model NAME]\n"
        "nlnet convert --to caffe2 IN.pt OUT.pkl   (export an nlnet model)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="ARG",
        help="SOURCE IN OUT (SOURCE: caffe2, mmaction2, pyslowfast) | IN.pt OUT.pkl (with --to caffe2)",
    )
    parser.add_argument("--to", choices=("pytorch", "caffe2"), default="pytorch", help="target format")
    parser.add_argument("--model", help="model name the file was trained as (import only), e.g. nl_i3d_r50")
    parser.add_argument("--nonlocal-norm", choices=("bn", "none"), help="default: detected from the file")
    parser.add_argument(
        "--nonlocal-mode",
        choices=("embedded_gaussian", "dot_product", "gaussian", "concatenation"),
        help="default: detected from the weights or the file's config (mmaction2, PySlowFast)",
    )
    parser.add_argument(
        "--clip", help="stem variant, e.g. 8x8_pyslowfast for PySlowFast's Caffe2 zoo .pkl (default: the model's)"
    )
    parser.set_defaults(func=_convert)


def _convert(args: argparse.Namespace) -> int:
    from nlnet import weights

    if args.to == "caffe2":
        if len(args.paths) != 2:
            raise ValueError(f"--to caffe2 takes IN.pt OUT.pkl, got {args.paths}")
        names = weights.export_caffe2(args.paths[0], args.paths[1])
        print(f"wrote {len(names)} blobs to {args.paths[1]}")
        return 0
    if len(args.paths) != 3 or args.paths[0] not in _IMPORT_SOURCES:
        raise ValueError(f"import takes: {{{','.join(_IMPORT_SOURCES)}}} IN OUT [--model NAME], got {args.paths}")
    source, in_path, out_path = args.paths
    overrides = {}
    if args.nonlocal_norm is not None:
        overrides["nonlocal_norm"] = None if args.nonlocal_norm == "none" else "bn"
    if args.nonlocal_mode is not None:
        overrides["nonlocal_mode"] = args.nonlocal_mode
    if args.clip is not None:
        overrides["clip"] = args.clip
    if source == "caffe2" and args.model is None:
        raise ValueError("--model NAME is required to import a Caffe2 file")
    convert = getattr(weights, f"convert_{source}")
    report = convert(in_path, out_path, args.model, **overrides)
    print(report.summary())
    print(f"wrote {out_path}")
    return 0


# ------------------------------------------------------------------------------------------ attention maps


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
    import json
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
        f"{report.block}: over {report.clips} test clips, the top key of a query at the cue lies on the "
        f"object the label depends on in {report.on_target:.1%} (a random key: {report.chance:.1%}); "
        f"on the {report.multi_object_clips} clips with several objects {report.on_target_multi:.1%} "
        f"(random: {report.chance_multi:.1%}); accuracy {report.accuracy:.1%}"
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


# ---------------------------------------------------------------------------------- built-in set studies


def _add_demo(subparsers: _Subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "demo",
        parents=[common],
        help="train and test C2D and NL C2D on the built-in data set, print their top-1 (make run)",
        description="Generates the built-in set once (H.264 mp4s in the user cache), trains the tiny NL C2D of "
        "the builtin_nl_c2d recipe and its C2D baseline at equal budget, tests both with the multi-view "
        "protocol, keeps the checkpoints, draws the non-local block's attention and prints the table. Runs "
        "already in OUT_DIR are continued, not repeated. Overrides are dotted KEY=VALUE pairs for both recipes.",
    )
    parser.add_argument("--out-dir", default="runs/builtin_demo", help="runs, results.md and attention.png")
    parser.add_argument("--no-figure", action="store_true", help="skip the attention figure")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from nlnet.experiments import demo

    demo(args.out_dir, overrides=args.overrides, device=args.device, figure=not args.no_figure)
    return 0


def _add_ablate(subparsers: _Subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "ablate",
        parents=[common],
        help="the paper's Table 2 ablations in miniature on the built-in data set (markdown table)",
        description="Trains and tests each network of the chosen axes with the built-in recipe and writes "
        "OUT/ablation.md and OUT/ablation.json beside the paper's Kinetics numbers. Finished runs are reused, so "
        "an interrupted ablation continues. Overrides are dotted KEY=VALUE pairs for every run.",
    )
    parser.add_argument("--out", default="runs/builtin_ablation", help="output folder")
    parser.add_argument(
        "--axes",
        nargs="+",
        metavar="AXIS",
        help="instantiation, stage, blocks, extent, conv3d (default: all, in the paper's order)",
    )
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per network (default 1)")
    parser.add_argument("--config", help="base recipe name or YAML file (default builtin_nl_c2d)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.set_defaults(func=_ablate)


def _ablate(args: argparse.Namespace) -> int:
    from nlnet.engine.builtin import DEFAULT_CONFIG
    from nlnet.experiments import ablate

    ablate(
        args.out,
        axes=args.axes,
        seeds=args.seeds,
        config=args.config or DEFAULT_CONFIG,
        overrides=args.overrides,
        device=args.device,
    )
    return 0


# ------------------------------------------------------------------------------------------------ the parser


_COMMANDS = (
    _add_train, _add_test, _add_predict, _add_detect, _add_info, _add_convert, _add_visualize, _add_demo, _add_ablate
)


def _build_parser() -> argparse.ArgumentParser:
    # --debug is accepted before and after the command name; SUPPRESS keeps a subcommand's absent flag from
    # resetting one given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    parser = argparse.ArgumentParser(prog="nlnet", description="Non-local Neural Networks (Wang et al., CVPR 2018)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(subparsers, common)
    return parser


def _one_line(err: BaseException) -> str:
    # str(KeyError) is the repr of its key; its argument is the message.
    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return "; ".join(line.strip() for line in message.splitlines() if line.strip()) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; bad input prints ``nlnet COMMAND: error: ...`` on stderr and returns 2."""
    args = _build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _USER_ERRORS as err:
        if args.debug:
            raise
        command = " ".join(filter(None, (args.command, getattr(args, "detect_command", None))))
        print(f"nlnet {command}: error: {_one_line(err)} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
