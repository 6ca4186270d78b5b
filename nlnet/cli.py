"""The ``nlnet`` command line: argument parsing only; every command calls the Python API.

Each command is one ``_cmd_<name>(subparsers)`` function that declares its arguments and sets ``func``,
the API call it makes. Heavy imports happen inside ``func`` so that ``nlnet --help`` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nlnet", description="Non-local Neural Networks (Wang et al., CVPR 2018)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, value in sorted(globals().items()):
        if name.startswith("_cmd_") and callable(value):
            value(subparsers)
    return parser


def _cmd_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a video model from a YAML recipe (torchrun --nproc_per_node=N -m nlnet train: DDP)",
        description="Train with the paper's recipe. Overrides are dotted KEY=VALUE pairs (train.max_iter=9).",
    )
    parser.add_argument("--config", required=True, help="YAML recipe, one of configs/*.yaml")
    parser.add_argument("--output-dir", help="where checkpoints and logs go (overrides output_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir's latest checkpoint")
    parser.add_argument("--resume-from", metavar="CKPT", help="continue from this checkpoint")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")

    def run(args: argparse.Namespace) -> int:
        import logging
        import os

        from nlnet.engine.config import load_config
        from nlnet.engine.train import train

        if int(os.environ.get("RANK", "0")) == 0:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
        overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
        cfg = load_config(args.config, overrides)
        result = train(cfg, resume=args.resume_from or args.resume, device=args.device)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"finished at iteration {result['iteration']}: {result['checkpoint']}")
            for name, value in result["metrics"].items():
                print(f"val {name}: {value:.4f}")
            if result["skipped"]:
                print(f"{len(result['skipped'])} unreadable videos skipped: " + ", ".join(result["skipped"]))
        return 0

    parser.set_defaults(func=run)


def _cmd_test(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "test",
        help="evaluate a checkpoint (10 clips x 3 crops, fully convolutional; or --single-view)",
        description="Evaluate a checkpoint on data.test_list and write per-video scores as JSON.",
    )
    parser.add_argument("--config", required=True, help="the recipe the checkpoint was trained with")
    parser.add_argument("--checkpoint", required=True, help="nlnet checkpoint or model state dict")
    parser.add_argument("--single-view", action="store_true", help="one centre clip, centre crop per video")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="annotation list to use")
    parser.add_argument("--output", help="JSON of per-video scores (default: output_dir/test_<ckpt>.json)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")

    def run(args: argparse.Namespace) -> int:
        import os

        from nlnet.engine.config import load_config
        from nlnet.engine.evaluate import test

        cfg = load_config(args.config, args.overrides)
        result = test(
            cfg,
            args.checkpoint,
            single_view=args.single_view,
            split=args.split,
            output=args.output,
            device=args.device,
        )
        if int(os.environ.get("RANK", "0")) == 0:
            for name, value in result["metrics"].items():
                print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
            if result["skipped"]:
                print(f"{len(result['skipped'])} unreadable videos skipped: " + ", ".join(result["skipped"]))
            print(f"per-video scores: {result['output']}")
        return 0

    parser.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
