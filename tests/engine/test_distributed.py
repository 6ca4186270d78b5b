"""Two-process (gloo, CPU) runs under torchrun: every rank stops, skips and resumes together.

The scenarios are in ``dist_scenarios.py``; each rank reports what it saw in ``rank<r>.json``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from nlnet.engine.checkpoint import checkpoint_path, save_checkpoint

SCRIPT = Path(__file__).with_name("dist_scenarios.py")
# Each run starts three interpreters that import torch: about a minute on a busy 2-core machine. The
# single-process mechanisms are covered quickly in test_engine_fixes.py.
pytestmark = pytest.mark.slow


def _run(python: str, env: dict, out: Path, scenario: str, *args: str, timeout: float = 120) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    command = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT)]
    subprocess.run([*command, scenario, str(out), *args], env=env, capture_output=True, timeout=timeout)
    return [json.loads((out / f"rank{rank}.json").read_text(encoding="utf-8")) for rank in (0, 1)]


def test_a_nan_loss_on_one_rank_stops_both_within_seconds(
    tmp_path, video_set, tiny_recipe, write_recipe, child_env, python
):
    # Rank 1's loss at iteration 2 is NaN, in the middle of a 3-iteration log period; rank 0's are finite.
    # Before, rank 1 raised alone and rank 0 waited in DDP's gradient all-reduce (gloo: 30 minutes).
    recipe = tiny_recipe(
        video_set,
        tmp_path / "run",
        train__batch_size=4,
        train__max_iter=6,
        train__log_period=3,
        train__checkpoint_period=6,
        train__precise_bn=False,
    )
    ranks = _run(python, child_env, tmp_path / "out", "nan_on_rank_one", str(write_recipe(tmp_path / "r.yaml", recipe)))
    for rank in ranks:
        assert rank.get("error") == "FloatingPointError", rank
        assert "iterations 1-3" in rank["message"]
    assert not list((tmp_path / "run").glob("checkpoint_*.pt"))  # the diverged weights were never saved


def test_the_resume_file_is_the_one_rank_zero_sees(tmp_path, child_env, python):
    # Ranks on machines without a shared disk: rank 0's folder has iterations 4 and 8, rank 1's only 4.
    shared, local = tmp_path / "rank0_view", tmp_path / "rank1_view"
    for folder, iterations in ((shared, (4, 8)), (local, (4,))):
        for iteration in iterations:
            save_checkpoint(checkpoint_path(folder, iteration), {"iteration": iteration})
    ranks = _run(python, child_env, tmp_path / "out", "resume_choice", str(shared), str(local))
    assert [rank["chosen"] for rank in ranks] == [str(checkpoint_path(shared, 8))] * 2, ranks
    assert all(rank["fresh"].startswith("FileExistsError") for rank in ranks), ranks

    empty = tmp_path / "empty"
    ranks = _run(python, child_env, tmp_path / "out2", "resume_choice", str(empty), str(shared))
    assert [rank["chosen"] for rank in ranks] == ["None", "None"]  # rank 0 sees none: both start afresh
    assert [rank["fresh"] for rank in ranks] == ["allowed", "allowed"]


def test_precise_bn_skips_a_batch_on_every_rank_when_one_rank_has_it_empty(tmp_path, child_env, python):
    ranks = _run(python, child_env, tmp_path / "out", "precise_bn_with_an_empty_batch")
    assert [rank.get("used") for rank in ranks] == [3, 3], ranks
    assert ranks[0]["running_mean"] == ranks[1]["running_mean"]  # statistics summed over both ranks


def test_precise_bn_of_nl_i3d_over_two_ranks_equals_the_moments_of_all_their_inputs(tmp_path, child_env, python):
    ranks = _run(python, child_env, tmp_path / "out", "precise_bn_exact_nl_i3d")
    for rank in ranks:
        assert "errors" in rank, rank
        assert any(name.startswith("res3") and "nonlocal" in name for name in rank["errors"]), rank
        assert max(rank["errors"].values()) < 1e-5, rank["errors"]
