"""``nlnet detect``: Mask/Keypoint R-CNN with non-local blocks (train, eval, cost, demo)."""

from __future__ import annotations

import argparse
import json

from nlnet.cli.common import _is_main_rank, _log_to_stderr, _recipe, _Subparsers


def _add_detect(subparsers: _Subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "detect",
        help="Mask/Keypoint R-CNN with non-local blocks (paper §6): train, eval, cost, demo",
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
    demo_parser = commands.add_parser(
        "demo",
        parents=[common],
        help="with vs without non-local blocks on the built-in context set, per seed",
        description="Train the context recipe with and without its non-local blocks for seeds 0..N-1 (runs "
        "continue from their checkpoints) and print box AP and mask (or keypoint) AP per seed, mean ± std.",
    )
    for sub in (train_parser, eval_parser, cost_parser, demo_parser):
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
    demo_parser.add_argument("--task", choices=("instances", "keypoints"), default="instances")
    demo_parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    demo_parser.add_argument("--out-dir", default="runs/detect_demo", help="runs and <task>_results.md")
    demo_parser.set_defaults(func=_detect_demo)


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
    from nlnet.engine import detection

    _log_to_stderr()
    cfg = detection.load_config(args.config, args.overrides)
    result = detection.measure_cost(cfg, steps=args.steps, image_size=args.image_size, device=args.device)
    print(json.dumps(result, indent=2))
    return 0


def _detect_demo(args: argparse.Namespace) -> int:
    from nlnet.experiments.detect_demo import detect_demo

    _log_to_stderr()
    detect_demo(args.task, seeds=args.seeds, out_dir=args.out_dir, overrides=args.overrides, device=args.device)
    return 0
