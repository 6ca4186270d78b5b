"""``benchmarks/soak.py``: a loader worker's resident memory stays flat while it decodes clip after clip."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("soak_benchmark", SOAK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.soak


def test_worker_memory_is_flat_over_400_clips():
    result = load_soak()(400, settle=200)
    assert result["clips"] >= 400 and result["skipped"] > 0  # the corrupt file was met and skipped
    assert result["growth_mb"] < 50, result


@pytest.mark.slow
def test_worker_memory_is_flat_over_5000_clips():
    result = load_soak()(5000, settle=200)
    assert result["clips"] >= 5000
    assert result["growth_mb"] < 50, result
