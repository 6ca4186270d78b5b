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


# Torch's own thread count at start (OMP_NUM_THREADS when set, else the cores): the most a study will use.
_START_THREADS = torch.get_num_threads()


def set_threads(cfg: DictConfig, device: str | None) -> None:
    """On CPU, leave one core to each data-loading worker that decodes: decoding and the training step overlap.

    With ``data.cache_decoded`` the workers decode only before the first epoch and then merely cut clips from
    memory, so the training step keeps every thread. Never more than ``OMP_NUM_THREADS`` when it is set.
    """
    if device == "cuda" or (device is None and torch.cuda.is_available()):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    decoding_workers = 0 if cfg.data.get("cache_decoded") else int(cfg.train.num_workers)
    torch.set_num_threads(max(1, min(_START_THREADS, cores - decoding_workers)))


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
