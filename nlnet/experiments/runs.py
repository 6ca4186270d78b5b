"""One run of a study: train a recipe on the built-in set, test its final checkpoint, time both."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from omegaconf import DictConfig

from nlnet.engine.build import build_network
from nlnet.engine.evaluate import test
from nlnet.engine.train import train

__all__ = ["set_threads", "train_and_test"]


def set_threads(cfg: DictConfig, device: str | None) -> None:
    """On CPU, leave one core to each data-loading worker: decoding and the training step then overlap."""
    if device == "cuda" or (device is None and torch.cuda.is_available()):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores - int(cfg.train.num_workers)))


def _count_parameters(cfg: DictConfig) -> int:
    # Counting needs the architecture only: no weights are read from disk.
    return sum(p.numel() for p in build_network(cfg.model).parameters())


def train_and_test(cfg: DictConfig, device: str | None) -> dict[str, Any]:
    """Trains ``cfg`` (continuing from its output folder's latest checkpoint), tests the final checkpoint.

    Returns:
        {"top1", "checkpoint", "params", "train_s", "test_s"}.
    """
    start = time.perf_counter()
    result = train(cfg, resume=True, device=device)
    trained = time.perf_counter()
    tested = test(cfg, result["checkpoint"], device=device)
    return {
        "top1": float(tested["metrics"]["top1"]),
        "checkpoint": result["checkpoint"],
        "params": _count_parameters(cfg),
        "train_s": trained - start,
        "test_s": time.perf_counter() - trained,
    }
