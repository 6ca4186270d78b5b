"""Video-model commands: train, test, predict, info, convert, demo and ablate."""

from __future__ import annotations

import argparse

from nlnet.cli.common import _is_main_rank, _log_to_stderr, _print_metrics, _print_skipped, _recipe, _Subparsers


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
    parser.add_argument(
        "--check",
        action="store_true",
        help="after importing, run the source framework's network (mmaction2 or PySlowFast, when importable) and "
        "nlnet's on one random clip; print each stage's largest difference; exit 1 when the logits differ beyond "
        "--tolerance",
    )
    parser.add_argument(
        "--tolerance", type=float, default=1e-4, help="--check: allowed difference / largest logit (default 1e-4)"
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
    if args.check:
        from nlnet.weights.parity import check_converted

        check = check_converted(source, in_path, out_path, tolerance=args.tolerance)
        print(check.summary())
        return 0 if check.passed or not check.checked else 1
    return 0


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
    parser.add_argument(
        "--seeds",
        type=int,
        help="run N training seeds (--first-seed, --first-seed + 1, ...) into OUT_DIR/seed_S and print a table "
        "per seed with mean and min (default: one run with the recipe's seed)",
    )
    parser.add_argument("--first-seed", type=int, default=0, help="first training seed of --seeds (default 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from nlnet.experiments import demo, demo_seeds

    if args.seeds is None:
        demo(args.out_dir, overrides=args.overrides, device=args.device, figure=not args.no_figure)
        return 0
    if args.seeds < 1 or args.no_figure:
        raise ValueError(
            f"--seeds needs N >= 1 and the attention figure, got --seeds {args.seeds} with --no-figure={args.no_figure}"
        )
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    demo_seeds(args.out_dir, seeds, overrides=args.overrides, device=args.device)
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
