"""Smoke test of ``benchmarks/gpu.py``: on the CPU with ``--quick`` every section runs and both files are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_cpu_run_writes_every_section_to_json_and_markdown(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick",
                    "--out", str(tmp_path)], check=True, env=env, capture_output=True, timeout=300)
    report = json.loads((tmp_path / "gpu.json").read_text(encoding="utf-8"))
    assert list(report["sections"]) == ["block", "model", "loader", "ddp"]
    block = report["sections"]["block"]["rows"]
    assert {row["precision"] for row in block} == {"float32", "bf16"}
    assert {"nlnet", "explicit"} <= {row["impl"] for row in block}
    nlnet = [row for row in block if row["impl"] == "nlnet" and row["status"] == "ok"]
    assert nlnet and all(set(row["restricted"]) == {"flash", "memory_efficient", "cudnn", "math"} for row in nlnet)
    model = report["sections"]["model"]["rows"]
    assert sorted((row["clip"], row["compiled"]) for row in model) == [
        ("32x2", False), ("32x2", True), ("8x8", False), ("8x8", True)]
    for name in ("model", "loader", "ddp"):
        rows = report["sections"][name]["rows"]
        assert rows and all(row["status"] == "ok" and row["clips_per_s"] > 0 for row in rows), name
    assert [(row["augment_on"], row["feeds_training"]) for row in report["sections"]["loader"]["rows"]] == [
        ("worker", False), ("worker", True), ("device", False), ("device", True)]
    assert [row["processes"] for row in report["sections"]["ddp"]["rows"]] == [1, 2]
    table = (tmp_path / "gpu.md").read_text(encoding="utf-8")
    for heading in ("Non-local block", "Training steps", "Loader", "DDP"):
        assert heading in table
