"""Atomic checkpoint files, safe loading, resume and pruning, and the random-number state of an exact resume.

A checkpoint is written to a temporary file in the same directory, flushed to disk, then renamed over the
target, so a process killed mid-write leaves either the old file or the new one, never a torn one. Loading
uses ``torch.load(weights_only=True)``: only tensors and plain containers are accepted, never arbitrary
pickles, which is why the NumPy and Python RNG states are stored as tensors and ints.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nlnet.engine.distributed import broadcast_object
from nlnet.utils.io import atomic_write

__all__ = [
    "DETECTION_CHECKPOINT_FORMAT",
    "checkpoint_path",
    "get_rng_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "resolve_resume",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
]

# The ``format`` entry of a detection training checkpoint (``nlnet.engine.detection``): it tells a detector's
# checkpoint from a video model's wherever one is read.
DETECTION_CHECKPOINT_FORMAT = "nlnet-detection-1"

_NAME = re.compile(r"^checkpoint_(\d+)\.pt$")


def checkpoint_path(directory: str | Path, iteration: int) -> Path:
    """The file name used for the checkpoint after ``iteration`` optimiser steps."""
    return Path(directory) / f"checkpoint_{iteration:08d}.pt"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Writes ``state`` atomically (temporary file in the same directory, fsync, os.replace).

    Args:
        path: destination file; its directory is created if needed.
        state: tensors, numbers, strings and nested lists/tuples/dicts of them (what weights_only loads).
    """
    atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads a checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a weights-only checkpoint holding a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable weights-only checkpoint ({err})") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict, got {type(state).__name__}")
    return state


def list_checkpoints(directory: str | Path) -> list[Path]:
    """``checkpoint_<iteration>.pt`` files in ``directory``, oldest iteration first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint with the highest iteration in ``directory`` (temporary files ignored), or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def prune_checkpoints(directory: str | Path, keep: int) -> None:
    """Deletes all but the ``keep`` newest checkpoints in ``directory``; ``keep=0`` keeps every one."""
    if keep:
        for old in list_checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)


def resolve_resume(directory: str | Path, resume: bool | str | Path) -> Path | None:
    """The checkpoint a run resumes from, as rank 0 sees it, on every process.

    Args:
        directory: the run's output folder.
        resume: False (the folder must hold no checkpoint), True (its latest checkpoint, or None when it has
            none) or a checkpoint path.

    Raises:
        FileExistsError / FileNotFoundError on every process when rank 0 finds the folder taken or the given
        file missing. Processes on machines that do not share a disk would otherwise each pick their own
        latest file, or one would stop alone and leave the others waiting.
    """
    directory = Path(directory)
    choice: tuple[str, str | None] = ("none", None)
    if resume is True:
        latest = latest_checkpoint(directory)
        choice = ("path", None if latest is None else str(latest))
    elif resume:
        path = Path(resume)
        choice = ("path", str(path)) if path.is_file() else ("missing", str(path))
    elif latest_checkpoint(directory) is not None:
        choice = ("taken", str(directory))
    kind, value = broadcast_object(choice)
    if kind == "missing":
        raise FileNotFoundError(f"checkpoint to resume from not found: {value}")
    if kind == "taken":
        raise FileExistsError(
            f"{value} already holds checkpoints; pass --resume to continue or choose another output_dir"
        )
    return None if value is None else Path(value)


def seed_everything(seed: int) -> None:
    """Seeds the torch (CPU and CUDA), NumPy and Python generators: the state :func:`get_rng_state` saves."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Torch (CPU and CUDA), NumPy and Python RNG states, in a form ``weights_only`` can load."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`get_rng_state` returned (tensors on any device: they are read back to the host)."""
    torch.set_rng_state(state["torch"].cpu())
    npy = state["numpy"]
    keys = npy["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].cpu().tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
