"""``benchmarks/soak.py``: a loader worker's private memory stays flat while it decodes clip after clip.

The soak runs in a fresh interpreter, as a training run would: a worker forked from the test process would
inherit pytest's heap and grow as it touches those copy-on-write pages, which says nothing about decoding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def soak(tmp_path: Path, clips: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    out = tmp_path / "soak.json"
    command = [sys.executable, str(REPO / "benchmarks" / "soak.py"), "--clips", str(clips), "--json", str(out)]
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=3600)
    return json.loads(out.read_text(encoding="utf-8"))


def test_worker_memory_is_flat_over_600_clips(tmp_path):
    result = soak(tmp_path, 600)
    assert result["clips"] >= 600 and result["skipped"] > 0  # the corrupt file was met and skipped
    assert result["growth_mb"] < 50, result


@pytest.mark.slow
def test_worker_memory_is_flat_over_5000_clips(tmp_path):
    result = soak(tmp_path, 5000)
    assert result["clips"] >= 5000
    assert result["growth_mb"] < 50, result
