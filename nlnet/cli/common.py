"""Helpers shared by the command modules: printing, logging on rank 0, the recipe of a checkpoint."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

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
