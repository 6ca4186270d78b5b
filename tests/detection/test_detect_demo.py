"""``nlnet detect demo``: both detectors train and are scored on the context set end to end; the table."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_detector import SMALL_PROPOSALS

from nlnet.cli import main
from nlnet.data.context_coco import CUE_NAMES
from nlnet.experiments.detect_demo import detections_figure, format_detect_demo


def _tiny(tmp_path) -> list[str]:
    return [
        f"data.root={tmp_path / 'data'}",
        "data.shapes_train_images=4",
        "data.shapes_val_images=2",
        "data.shapes_image_size=[112,120]",
        "model.overrides.min_size=112",
        "model.overrides.max_size=120",
        *SMALL_PROPOSALS,
        "train.max_iter=1",
        "train.warmup_iters=1",
        "train.decay_steps=[2]",
        "train.checkpoint_period=1",
        "train.log_period=1",
        "test.batch_size=2",
    ]


@pytest.mark.parametrize("task, second, blocks", [("instances", "segm", 1), ("keypoints", "keypoints", 5)])
def test_demo_trains_and_scores_both_variants(tmp_path, capsys, task: str, second: str, blocks: int) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "demo"
    assert main(["detect", "demo", "--task", task, "--seeds", "1", "--out-dir", str(out), *_tiny(tmp_path)]) == 0
    printed = capsys.readouterr().out
    label = "mask AP" if task == "instances" else "keypoint AP"
    assert f"| {label} + NL |" in printed and "| mean ± std |" in printed
    assert (out / f"{task}_results.md").read_text().strip() in printed
    for variant, expected_blocks in (("nl", blocks), ("base", 0)):
        run = out / task / f"seed0_{variant}"
        state = torch.load(run / "checkpoint_00000001.pt", weights_only=True)
        kernels = [k for k in state["model"] if "nonlocal_after_" in k and k.endswith(".theta.weight")]
        assert len(kernels) == expected_blocks
        results = json.loads((run / "results.json").read_text())
        # the context instances have three classes, so the class report comes too; the kites have one
        assert set(results["metrics"]) == ({"bbox", second, "classes"} if task == "instances" else {"bbox", second})
        assert state["config"]["seed"] == 0 and state["config"]["data"]["format"] == "context"
        # both recipes train with GroupNorm in the backbone: no batch statistics there
        assert not [k for k in state["model"] if k.startswith("backbone.body.") and k.endswith("running_mean")]
    # the table's numbers are the runs' COCOeval APs
    nl = json.loads((out / task / "seed0_nl" / "results.json").read_text())["metrics"]
    row = next(line for line in printed.splitlines() if line.startswith("| 0 |")).split("|")
    assert float(row[3]) == pytest.approx(100 * nl["bbox"]["AP"], abs=0.051)
    assert float(row[6]) == pytest.approx(100 * nl[second]["AP"], abs=0.051)
    # the last column is each run's logged step time, which a second call (it only re-scores) prints again
    logged = []
    for variant in ("base", "nl"):
        events = (out / task / f"seed0_{variant}" / "metrics.jsonl").read_text().splitlines()
        logged.append(next(e["step_s"] for e in map(json.loads, events) if e["event"] == "train"))
    assert row[-2].strip() == f"{logged[0]:.2f} / {logged[1]:.2f}"
    assert main(["detect", "demo", "--task", task, "--seeds", "1", "--out-dir", str(out), *_tiny(tmp_path)]) == 0
    again = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0 |"))
    assert again.split("|") == row
    if task == "instances":
        assert float(row[9]) == pytest.approx(100 * nl["classes"]["agnostic_AP"], abs=0.051)
        assert float(row[11]) == pytest.approx(100 * (nl["classes"]["right_class"] or 0.0), abs=0.051)
    if task == "instances":
        image = tmp_path / "data" / "context_top_instances_val" / "000000.png"
        runs = {"NL": "seed0_nl", "base": "seed0_base"}
        panels = {name: out / task / run / "checkpoint_00000001.pt" for name, run in runs.items()}
        drawn = detections_figure(panels, image, tmp_path / "fig.png", min_score=0.0)
        assert (tmp_path / "fig.png").stat().st_size > 0 and set(drawn) == {"NL", "base"}
        scores = [score for boxes in drawn.values() for _, score in boxes]
        assert all(name in CUE_NAMES for boxes in drawn.values() for name, _ in boxes)
        assert all(0 <= s <= 1 for s in scores)


def test_table_has_per_seed_gains_and_mean_and_std() -> None:
    rows = [
        {"seed": 0, "variant": "base", "box_ap": 30.0, "second_ap": 20.0, "step_s": 1.5},
        {"seed": 0, "variant": "nl", "box_ap": 40.0, "second_ap": 26.0, "step_s": 1.625},
        {"seed": 1, "variant": "base", "box_ap": 34.0, "second_ap": 22.0, "step_s": 1.0},
        {"seed": 1, "variant": "nl", "box_ap": 40.0, "second_ap": 30.0, "step_s": 1.25},
    ]
    table = format_detect_demo("instances", rows).splitlines()
    assert table[2] == "| 0 | 30.0 | 40.0 | +10.0 | 20.0 | 26.0 | +6.0 | 1.50 / 1.62 |"
    # gains 10 and 6: mean 8, sample std sqrt(8) = 2.83
    assert table[-1] == "| mean ± std | 32.0 ± 2.8 | 40.0 ± 0.0 | 8.0 ± 2.8 | 21.0 ± 1.4 | 28.0 ± 2.8 | 7.0 ± 1.4 | |"
    for row, (agnostic, right) in zip(rows, ((60.0, 30.0), (61.0, 90.0), (62.0, 40.0), (63.0, 80.0)), strict=True):
        row.update(agnostic_ap=agnostic, right_class=right)
    table = format_detect_demo("instances", rows).splitlines()
    assert table[0].endswith("| right class % | + NL | s / step (base / NL) |")
    assert table[2] == "| 0 | 30.0 | 40.0 | +10.0 | 20.0 | 26.0 | +6.0 | 60.0 | 61.0 | 30.0 | 90.0 | 1.50 / 1.62 |"
    assert table[-1].endswith("| 61.0 ± 1.4 | 62.0 ± 1.4 | 35.0 ± 7.1 | 85.0 ± 7.1 | |")
    with pytest.raises(ValueError, match="needs one 'nl' and one 'base'"):
        format_detect_demo("keypoints", rows[:3])


def test_context_recipes_load_and_clip_must_be_positive() -> None:
    from nlnet.engine import detection

    for recipe in ("detection/context_maskrcnn_r50", "detection/context_keypointrcnn_r50"):
        cfg = detection.load_config(recipe)
        assert cfg.data.format == "context" and cfg.train.clip_grad_norm == 10.0
        assert cfg.model.backbone_norm == "gn" and cfg.model.nonlocal_norm is None
    with pytest.raises(ValueError, match="clip_grad_norm must be > 0"):
        detection.load_config("detection/context_maskrcnn_r50", ["train.clip_grad_norm=0"])
    with pytest.raises(ValueError, match="nonlocal_lr_mult must be > 0, got -1"):
        detection.load_config("detection/context_maskrcnn_r50", ["train.nonlocal_lr_mult=-1"])
    with pytest.raises(ValueError, match="'shapes', 'context' or 'coco'"):
        detection.load_config(None, ["data.format=voc"])
