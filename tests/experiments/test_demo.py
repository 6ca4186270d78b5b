"""The studies on the built-in set: `demo` and `ablate` end to end at toy size.

Everything is real: the set is generated as H.264 mp4 files, decoded with PyAV, trained with the engine's
loop and tested with its multi-view protocol; only the sizes are tiny (16 training clips, 2 iterations).
"""

from __future__ import annotations

import json

import pytest
import torch

from nlnet.cli import main
from nlnet.experiments import ABLATION_AXES, ablate, demo, demo_seeds
from nlnet.layers import NonLocalBlock
from nlnet.viz.files import load_model

TOY = [
    "data.builtin.num_train=16",
    "data.builtin.num_test=8",
    "train.batch_size=8",
    "train.max_iter=2",
    "train.checkpoint_period=2",
    "train.log_period=1",
    "train.num_workers=0",
    "test.num_workers=0",
]


@pytest.fixture
def toy(tmp_path):
    return [*TOY, f"data.builtin.cache_dir={tmp_path / 'cache'}"]


def test_demo_and_ablation_end_to_end(tmp_path, toy, capsys):
    torch.manual_seed(0)
    result = demo(tmp_path / "demo", overrides=toy, device="cpu")
    printed = capsys.readouterr().out
    assert "| C2D | 0 |" in printed and "| NL C2D | 1 (res3) |" in printed
    runs = result["runs"]
    assert runs["nl_c2d"]["params"] > runs["c2d"]["params"]
    for name in ("nl_c2d", "c2d"):
        saved = torch.load(runs[name]["checkpoint"], weights_only=True)
        assert saved["iteration"] == 2
        scores = json.loads((tmp_path / "demo" / name / "test_checkpoint_00000002.json").read_text())
        assert len(scores["videos"]) == 8 and scores["metrics"]["top1"] == runs[name]["top1"]
        has_block = any("nonlocal_block" in key for key in saved["model"])
        assert has_block == (name == "nl_c2d")
    assert (tmp_path / "demo" / "attention.png").stat().st_size > 0
    assert (tmp_path / "demo" / "results.md").read_text().strip() == result["table"]

    table = ablate(tmp_path / "ablation", axes=["extent"], overrides=toy, device="cpu")
    document = json.loads((tmp_path / "ablation" / "ablation.json").read_text())
    expected = {f"{row.run}_s0" for row in ABLATION_AXES["extent"][1]}
    assert set(document["runs"]) == expected
    assert (tmp_path / "ablation" / "ablation.md").read_text().strip() == table.strip()
    for label in ("space-only", "time-only", "spacetime"):
        assert f"| {label} |" in table
    assert "not run" not in table
    # The ablation's base network is the demo's: one block in res3 whose keys are max-pooled 1x2x2, and the
    # extent lines change only the extent (a time-only block pools no space, as it attends to one place).
    for run, kernel in (("nl_c2d", (1, 2, 2)), ("space", (1, 2, 2)), ("time", None)):
        model, _ = load_model(document["runs"][f"{run}_s0"]["checkpoint"])
        blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, NonLocalBlock)]
        assert [(name.split(".")[0], m.pool_kernel) for name, m in blocks] == [("res3", kernel)]
    with pytest.raises(ValueError, match="axes must be"):
        ablate(tmp_path / "ablation", axes=["depth"], overrides=toy)


def test_demo_over_seeds_tabulates_each_seed_with_mean_and_min(tmp_path, toy, capsys):
    result = demo_seeds(tmp_path / "seeds", [3, 4], overrides=toy, device="cpu")
    table = (tmp_path / "seeds" / "seeds.md").read_text().strip()
    assert table == result["table"] and table in capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert list(rows) == ["3", "4", "mean", "min", "max"]
    nl = [100 * result["seeds"][seed]["runs"]["nl_c2d"]["top1"] for seed in (3, 4)]
    hits = [100 * result["seeds"][seed]["figure"].object_choice for seed in (3, 4)]
    assert rows["3"].endswith(f"| {nl[0]:.1f} | {hits[0]:.0f} |")
    assert rows["mean"].split(" | ")[2] == f"{(nl[0] + nl[1]) / 2:.1f}"
    assert rows["min"].split(" | ")[2] == f"{min(nl):.1f}"
    # Each seed is its own run: its sampler records the seed and its trained weights differ.
    states = [
        torch.load(result["seeds"][seed]["runs"]["nl_c2d"]["checkpoint"], weights_only=True) for seed in (3, 4)
    ]
    assert [state["sampler"]["seed"] for state in states] == [3, 4]
    assert any(not torch.equal(states[0]["model"][key], states[1]["model"][key]) for key in states[0]["model"])
    with pytest.raises(ValueError, match="at least one training seed"):
        demo_seeds(tmp_path / "none", [], overrides=toy)


def test_demo_seeds_on_the_command_line_rejects_zero_seeds(tmp_path, capsys):
    assert main(["demo", "--seeds", "0", "--out-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "--seeds needs N >= 1" in err and "got --seeds 0" in err and not (tmp_path / "none").exists()
