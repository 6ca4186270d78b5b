"""Two-process (gloo, CPU) runs under torchrun: every rank stops, skips and resumes together.

The scenarios are in ``dist_scenarios.py``. All of them run in one launch of two processes (starting interpreters
that import torch is most of the cost), and each rank reports what it saw in ``<scenario>.rank<r>.json``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from nlnet.engine.checkpoint import checkpoint_path, save_checkpoint
from nlnet.engine.distributed import configure_backends

SCRIPT = Path(__file__).with_name("dist_scenarios.py")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    # Ranks on machines without a shared disk: rank 0's folder has iterations 4 and 8, rank 1's only 4.
    named = {name: root / name for name in ("run", "out", "rank0_view", "rank1_view", "empty")}
    for folder, iterations in ((named["rank0_view"], (4, 8)), (named["rank1_view"], (4,))):
        for iteration in iterations:
            save_checkpoint(checkpoint_path(folder, iteration), {"iteration": iteration})
    named["out"].mkdir()
    return named


@pytest.fixture(scope="module")
def ranks(folders, video_set, tiny_recipe, write_recipe, child_env, python) -> dict[str, list[dict]]:
    """{scenario: [rank 0's report, rank 1's report]} of one two-process launch."""
    # Rank 1's loss at iteration 2 is NaN, in the middle of a 3-iteration log period; rank 0's are finite.
    recipe = tiny_recipe(
        video_set,
        folders["run"],
        train__batch_size=4,
        train__max_iter=6,
        train__log_period=3,
        train__checkpoint_period=6,
        train__precise_bn=False,
    )
    recipe_file = write_recipe(folders["out"] / "recipe.yaml", recipe)
    views = [str(folders["rank0_view"]), str(folders["rank1_view"])]
    plan = [
        ["resume_choice", views],
        ["resume_choice_none", [str(folders["empty"]), views[0]]],
        ["precise_bn_with_an_empty_batch", []],
        ["precise_bn_exact_nl_i3d", []],
        ["nan_on_rank_one", [str(recipe_file)]],
    ]
    plan_file = folders["out"] / "plan.json"
    plan_file.write_text(json.dumps(plan), encoding="utf-8")
    command = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT)]
    # Before the fix, a NaN on one rank left the other waiting in DDP's all-reduce (gloo: 30 minutes).
    done = subprocess.run([*command, str(folders["out"]), str(plan_file)], env=child_env, capture_output=True,
                          text=True, timeout=240)
    reports = {}
    for scenario, _ in plan:
        files = [folders["out"] / f"{scenario}.rank{rank}.json" for rank in (0, 1)]
        assert all(f.is_file() for f in files), (scenario, done.stdout[-3000:], done.stderr[-3000:])
        reports[scenario] = [json.loads(f.read_text(encoding="utf-8")) for f in files]
    return reports


def test_a_nan_loss_on_one_rank_stops_both(ranks, folders):
    for rank in ranks["nan_on_rank_one"]:
        assert rank.get("error") == "FloatingPointError", rank
        assert "iterations 1-3" in rank["message"]
    assert not list(folders["run"].glob("checkpoint_*.pt"))  # the diverged weights were never saved


def test_the_resume_file_is_the_one_rank_zero_sees(ranks, folders):
    chosen = [rank["chosen"] for rank in ranks["resume_choice"]]
    assert chosen == [str(checkpoint_path(folders["rank0_view"], 8))] * 2, ranks["resume_choice"]
    assert all(rank["fresh"].startswith("FileExistsError") for rank in ranks["resume_choice"])
    # Rank 0 sees no checkpoint (rank 1 does): both start afresh.
    assert [rank["chosen"] for rank in ranks["resume_choice_none"]] == ["None", "None"]
    assert [rank["fresh"] for rank in ranks["resume_choice_none"]] == ["allowed", "allowed"]


def test_precise_bn_skips_a_batch_on_every_rank_when_one_rank_has_it_empty(ranks):
    reports = ranks["precise_bn_with_an_empty_batch"]
    assert [rank.get("used") for rank in reports] == [3, 3], reports
    assert reports[0]["running_mean"] == reports[1]["running_mean"]  # statistics summed over both ranks


def test_precise_bn_of_nl_i3d_over_two_ranks_equals_the_moments_of_all_their_inputs(ranks):
    for rank in ranks["precise_bn_exact_nl_i3d"]:
        assert "errors" in rank, rank
        assert any(name.startswith("res3") and "nonlocal" in name for name in rank["errors"]), rank
        assert max(rank["errors"].values()) < 1e-5, rank["errors"]


def test_cudnn_benchmark_and_tf32_are_set_for_cuda_only():
    before = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        configure_backends("cpu", cudnn_benchmark=True, tf32=True)
        assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
        configure_backends(torch.device("cuda", 0), cudnn_benchmark=True, tf32=True)
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
