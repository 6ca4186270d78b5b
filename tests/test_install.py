"""A wheel install works away from the source tree: the recipes ship inside the package.

The wheel is built from a copy of the sources, installed without dependencies into a fresh virtual
environment, and ``nlnet demo`` and ``nlnet train`` (the wheel's console script) run their first iteration
from an empty folder. The new environment reaches torch and the other dependencies through a ``.pth`` line
naming this interpreter's site-packages: its own site-packages comes first on ``sys.path``, and a ``.pth`` line
adds a folder without running that folder's own ``.pth`` files, so the editable install's finder there stays
off and ``import nlnet`` is the wheel's.

Slow (about a minute: building, installing, generating a tiny built-in set, two short runs); ``make
test-install`` and CI run it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from tiny_builtin import TINY_BUILTIN

REPO = Path(__file__).resolve().parents[1]
TINY = TINY_BUILTIN


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done


def _build_wheel(tmp_path: Path) -> Path:
    # A copy, so that the build's egg-info and build/ folders never land in the working tree.
    source = tmp_path / "source"
    source.mkdir()
    shutil.copytree(REPO / "nlnet", source / "nlnet", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), "."], source)
    (wheel,) = (tmp_path / "dist").glob("nlnet-*.whl")
    return wheel


def _fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    _run([*pip, "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp_path)
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path)
    (Path(purelib.stdout.strip()) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


@pytest.mark.slow
def test_wheel_install_runs_demo_and_train_from_another_folder(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {"nlnet/configs/builtin_nl_c2d.yaml", "nlnet/configs/detection/shapes_maskrcnn_r50.yaml"} <= names

    venv = _fresh_venv(tmp_path, wheel)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    where = _run([str(venv / "bin" / "python"), "-c", "import nlnet; print(nlnet.__file__)"], work, env)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout

    cache = f"data.builtin.cache_dir={tmp_path / 'cache'}"
    nlnet = str(venv / "bin" / "nlnet")
    demo = _run([nlnet, "demo", "--no-figure", "--device", "cpu", *TINY, cache], work, env)
    assert "| NL C2D | 1 (res3) |" in demo.stdout and (work / "runs" / "builtin_demo" / "results.md").is_file()
    train = _run([nlnet, "train", "--device", "cpu", "--output-dir", "run", *TINY, cache], work, env)
    assert "finished at iteration 1" in train.stdout and (work / "run" / "checkpoint_00000001.pt").is_file()
