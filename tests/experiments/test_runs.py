"""How a study sets torch's CPU threads: one core per decoding worker, none for workers fed by the cache."""

from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf

from nlnet.experiments import runs


@pytest.fixture
def four_cores(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("cached", "workers", "start", "expected"),
    [
        (False, 2, 8, 2),  # two cores left to the two decoding workers
        (False, 6, 8, 1),  # never fewer than one thread
        (True, 2, 8, 4),  # cached clips: the workers do not decode, the step takes every core
        (True, 2, 1, 1),  # never more than OMP_NUM_THREADS asked for at start
    ],
)
def test_threads_follow_decoding_workers_and_the_start_count(four_cores, monkeypatch, cached, workers, start, expected):
    monkeypatch.setattr(runs, "_START_THREADS", start)
    cfg = OmegaConf.create({"data": {"cache_decoded": cached}, "train": {"num_workers": workers}})
    runs.set_threads(cfg, "cpu")
    assert torch.get_num_threads() == expected
