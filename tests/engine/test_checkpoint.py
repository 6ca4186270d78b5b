"""Checkpoint files: atomic writes, weights-only loading, finding the latest, pruning, seeding, RNG state."""

from __future__ import annotations

import fractions
import random

import numpy as np
import pytest
import torch

from nlnet.engine.checkpoint import (
    checkpoint_path,
    get_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)


def test_round_trip_is_weights_only_and_leaves_no_temporary_file(tmp_path):
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "iteration": 7, "names": ["a.mp4"], "lr": None}
    path = checkpoint_path(tmp_path, 7)
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["iteration"] == 7 and loaded["names"] == ["a.mp4"] and loaded["lr"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_00000007.pt"]


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "checkpoint_00000001.pt"
    save_checkpoint(path, {"iteration": 1})
    with pytest.raises(Exception):  # noqa: B017 (whatever torch.save raises for an unpicklable object)
        save_checkpoint(path, {"iteration": 2, "bad": lambda: None})
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_load_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": fractions.Fraction(1, 3)}, path)  # any class outside the weights-only allow-list
    with pytest.raises(ValueError, match="weights-only"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_latest_checkpoint_takes_the_highest_iteration_and_ignores_other_files(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "absent") is None
    for iteration in (2, 10, 9):
        save_checkpoint(checkpoint_path(tmp_path, iteration), {"iteration": iteration})
    (tmp_path / ".checkpoint_00000011.pt.abc.tmp").write_bytes(b"torn")
    (tmp_path / "checkpoint_final.pt").write_bytes(b"other")
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 10)


def test_rng_state_survives_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    torch.rand(5), np.random.rand(), random.random(), np.random.randn()  # advance; numpy caches a gaussian
    save_checkpoint(tmp_path / "rng.pt", {"rng": get_rng_state()})
    expected = (torch.rand(4), np.random.rand(3), np.random.randn(2), [random.random() for _ in range(3)])
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (torch.rand(4), np.random.rand(3), np.random.randn(2), [random.random() for _ in range(3)])
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[2], expected[2])
    assert got[3] == expected[3]


def test_pruning_keeps_the_newest_and_zero_keeps_all(tmp_path):
    for iteration in (3, 1, 20, 7):
        save_checkpoint(checkpoint_path(tmp_path, iteration), {"iteration": iteration})
    prune_checkpoints(tmp_path, 0)
    assert len(list_checkpoints(tmp_path)) == 4
    prune_checkpoints(tmp_path, 2)
    assert list_checkpoints(tmp_path) == [checkpoint_path(tmp_path, 7), checkpoint_path(tmp_path, 20)]


def test_seed_everything_seeds_torch_numpy_and_python():
    draws = []
    for _ in range(2):
        seed_everything(5)
        draws.append((torch.rand(3), np.random.rand(3), random.random()))
    assert torch.equal(draws[0][0], draws[1][0])
    np.testing.assert_array_equal(draws[0][1], draws[1][1])
    assert draws[0][2] == draws[1][2]
