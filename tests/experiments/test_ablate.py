"""The ablation table: mean and range over seeds beside the paper's numbers, and lines not yet run."""

from __future__ import annotations

from nlnet.experiments import ABLATION_AXES, format_ablation


def test_format_ablation_by_hand():
    results = {
        "c2d_s0": {"top1": 0.5, "params": 1234},
        "c2d_s1": {"top1": 0.7, "params": 1234},
        "nl_c2d_s0": {"top1": 0.6, "params": 2000},
    }
    table = format_ablation(results, ["blocks"], [0, 1])
    assert table.splitlines() == [
        f"**{ABLATION_AXES['blocks'][0]}**",
        "",
        "| model | params | built-in top-1 (%) | paper top-1 (%) |",
        "|---|---|---|---|",
        "| baseline | 1,234 | 60.0 (50.0-70.0, 2 seeds) | 71.8 |",
        "| 1 block (res3) ~ 1-block | 2,000 | 60.0 (1 of 2 seeds) | 72.7 |",
        "| 2 blocks (res3, res4; keys not pooled) ~ 5-block | | not run | 73.8 |",
        "| 4 blocks (res2-res5; keys not pooled) ~ 10-block | | not run | 74.3 |",
    ]


def test_rows_whose_seed_ranges_overlap_are_called_within_noise():
    scores = {"c2d": (0.40, 0.42), "gaussian": (0.90, 0.99), "nl_c2d": (0.95, 1.0), "dot_product": (0.50, 0.60)}
    results = {
        f"{run}_s{seed}": {"top1": top1, "params": 1}
        for run, pair in scores.items()
        for seed, top1 in enumerate(pair)
    }
    lines = format_ablation(results, ["instantiation"], [0, 1]).splitlines()
    # 90-99 and 95-100 share 95-99; 40-42 and 50-60 touch nothing; concatenation was not run.
    assert lines[-1] == "Within noise (seed ranges overlap): Gaussian ~ Gaussian, embed."
    assert "| concatenation | | not run | 72.8 |" in lines
    apart = format_ablation({k: v for k, v in results.items() if not k.startswith("gaussian")}, ["stage"], [0, 1])
    assert apart.splitlines()[-1].startswith("No two seed ranges overlap")
