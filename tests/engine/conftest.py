"""Fixtures for the engine tests: a small real mp4 data set and a tiny-model recipe that trains in seconds."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

NUM_CLASSES = 3
# Each class moves a random texture at its own speed, so the classes differ in motion, not only in colour.
TRAIN_VIDEOS = 6
TEST_VIDEOS = 3


def _moving_texture(seed: int, label: int, height: int, width: int) -> Callable[[int], np.ndarray]:
    texture = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return lambda index: np.roll(texture, index * (label + 1), axis=1)


@pytest.fixture(scope="session")
def video_set(tmp_path_factory: pytest.TempPathFactory, make_video) -> Path:
    """A directory with train.csv / test.csv (path_csv format) over 12-frame 32x40 H.264 mp4s."""
    root = tmp_path_factory.mktemp("videos")
    for split, count, offset in (("train", TRAIN_VIDEOS, 0), ("test", TEST_VIDEOS, 100)):
        rows = []
        for i in range(count):
            label = i % NUM_CLASSES
            name = f"{split}_{i}.mp4"
            make_video(root / name, 12, 32, 40, content=_moving_texture(offset + i, label, 32, 40))
            rows.append(f"{name},{label}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def _tiny_recipe(data_root: Path, output_dir: Path, **overrides: object) -> dict:
    """A complete recipe for a 3-class NL C2D with one block per stage, width 4, on 4-frame 32x32 clips.

    ``overrides`` are dotted keys (``train__max_iter=4`` for ``train.max_iter``).
    """
    recipe = {
        "seed": 3,
        "output_dir": str(output_dir),
        "model": {
            "name": "nl_c2d_r50",
            "dropout": 0.5,
            "overrides": {
                "stage_blocks": [1, 1, 1, 1],
                "base_width": 4,
                "clip": "8x8",
                # The preset's "5" layout needs the paper's stage lengths; one block per stage holds one here.
                "nonlocal_blocks": {"res3": [0]},
            },
        },
        "data": {
            "format": "path_csv",
            "root": str(data_root),
            "train_list": str(data_root / "train.csv"),
            "val_list": str(data_root / "test.csv"),
            "test_list": str(data_root / "test.csv"),
            "num_classes": NUM_CLASSES,
            "num_frames": 4,
            "sampling_rate": 2,
            "train_jitter_scales": [32, 40],
            "train_crop": 32,
            "test_scale": 32,
            "test_crop": 32,
            "test_clips": 2,
            "test_crops": 3,
        },
        "train": {
            "batch_size": 2,
            "max_iter": 6,
            "steps": [0, 4],
            "lrs": [1.0, 0.1],
            "base_lr": 0.05,
            "checkpoint_period": 2,
            "keep_checkpoints": 0,
            "log_period": 1,
            "precise_bn_batches": 2,
            "num_workers": 0,
            "tensorboard": False,
        },
        "test": {"num_workers": 0},
    }
    cfg = OmegaConf.create(recipe)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, force_add=True)
    return OmegaConf.to_container(cfg)


@pytest.fixture(scope="session")
def tiny_recipe() -> Callable[..., dict]:
    """``tiny_recipe(data_root, output_dir, **dotted_overrides) -> dict`` (see ``_tiny_recipe``)."""
    return _tiny_recipe


@pytest.fixture(scope="session")
def write_recipe() -> Callable[[Path, dict], Path]:
    """``write_recipe(path, recipe) -> path``: the recipe as a YAML file."""

    def write(path: Path, recipe: dict) -> Path:
        path.write_text(OmegaConf.to_yaml(OmegaConf.create(recipe)), encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def child_env() -> dict[str, str]:
    """Environment for child training processes: one thread (deterministic, fair on a shared machine)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def one_thread():
    """Runs the test with one intra-op thread, like the subprocess runs it is compared with."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def python() -> str:
    """The interpreter running the tests (the project's virtual environment)."""
    return sys.executable
