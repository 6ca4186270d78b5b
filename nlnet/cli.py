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


def _cmd_info(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="parameters, multiply-adds and non-local block positions of a video model",
        description="Counts parameters and multiply-adds (FLOPs / 2, torch.utils.flop_counter) of one clip "
        "without computing anything. NAME 'all' prints a table of every model.",
    )
    parser.add_argument("name", metavar="NAME", help="a model name (see nlnet.models.available()) or 'all'")
    parser.add_argument("--input", default="3x32x224x224", metavar="CxTxHxW", help="clip shape, batch 1")
    parser.add_argument("--num-classes", type=int, default=400)
    parser.add_argument("--clip", choices=("32x2", "8x8"), default="32x2", help="stem variant")
    parser.add_argument("--nonlocal-blocks", help="override: 0, 1, 5, 10 or res2..res5")

    def run(args: argparse.Namespace) -> int:
        from nlnet.models import available, describe

        try:
            shape = tuple(int(size) for size in args.input.lower().split("x"))
        except ValueError:
            shape = ()
        if len(shape) != 4:
            parser.error(f"--input must look like 3x32x224x224, got {args.input!r}")
        overrides = {"clip": args.clip}
        if args.nonlocal_blocks is not None:
            overrides["nonlocal_blocks"] = args.nonlocal_blocks
        if args.name != "all":
            print(describe(args.name, args.num_classes, shape, **overrides).summary())
            return 0
        print(f"{'model':<16}{'params':>10}{'GMACs':>9}{'NL':>4}")
        for name in available():
            info = describe(name, args.num_classes, shape, **overrides)
            blocks = len(info.nonlocal_inputs)
            print(f"{name:<16}{info.params / 1e6:>9.2f}M{info.macs / 1e9:>9.2f}{blocks:>4}")
        return 0

    parser.set_defaults(func=run)


def _cmd_convert(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="official Caffe2 model-zoo .pkl <-> nlnet .pt",
        description="nlnet convert caffe2 IN.pkl OUT.pt --model NAME   (import; the pickle is read without "
        "running any code)\nnlnet convert --to caffe2 IN.pt OUT.pkl   (export an nlnet model)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths", nargs="+", metavar="ARG", help="caffe2 IN.pkl OUT.pt | IN.pt OUT.pkl (with --to caffe2)"
    )
    parser.add_argument("--to", choices=("pytorch", "caffe2"), default="pytorch", help="target format")
    parser.add_argument("--model", help="model name the .pkl was trained as (import only), e.g. nl_i3d_r50")
    parser.add_argument("--nonlocal-norm", choices=("bn", "none"), help="default: detected from the file")

    def run(args: argparse.Namespace) -> int:
        from nlnet.weights import convert_caffe2, export_caffe2

        if args.to == "caffe2":
            if len(args.paths) != 2:
                parser.error(f"--to caffe2 takes IN.pt OUT.pkl, got {args.paths}")
            names = export_caffe2(args.paths[0], args.paths[1])
            print(f"wrote {len(names)} blobs to {args.paths[1]}")
            return 0
        if len(args.paths) != 3 or args.paths[0] != "caffe2":
            parser.error(f"import takes: caffe2 IN.pkl OUT.pt --model NAME, got {args.paths}")
        if args.model is None:
            parser.error("--model NAME is required to import a Caffe2 file")
        overrides = {}
        if args.nonlocal_norm is not None:
            overrides["nonlocal_norm"] = None if args.nonlocal_norm == "none" else "bn"
        report = convert_caffe2(args.paths[1], args.paths[2], args.model, **overrides)
        print(report.summary())
        print(f"wrote {args.paths[2]}")
        return 0

    parser.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
