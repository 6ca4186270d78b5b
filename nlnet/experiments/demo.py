"""C2D vs NL C2D on the built-in set at equal budget (``make run``, ``nlnet demo``).

`demo` trains the same tiny C2D with and without a non-local block, tests both, keeps the checkpoints, draws
the non-local block's attention and prints a top-1 table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from nlnet.engine.builtin import BASELINE_CONFIG, DEFAULT_CONFIG, resolve_builtin
from nlnet.engine.config import load_config
from nlnet.experiments.runs import set_threads, train_and_test
from nlnet.viz import builtin_attention_figure

__all__ = ["demo", "demo_seeds"]


def _placement(blocks: Any) -> str:
    """A recipe's ``nonlocal_blocks`` for a table: "1 (res3)" for {res3: [0]}; presets ("5") as they are."""
    if isinstance(blocks, Mapping):
        return f"{sum(len(indices) for indices in blocks.values())} ({', '.join(blocks)})"
    return str(blocks)


def demo(
    out_dir: str | Path = "runs/builtin_demo",
    *,
    config: str | Path = DEFAULT_CONFIG,
    baseline_config: str | Path = BASELINE_CONFIG,
    overrides: Sequence[str] = (),
    device: str | None = None,
    figure: bool = True,
) -> dict[str, Any]:
    """Trains and tests NL C2D and C2D on the built-in set at equal budget; prints and returns the table.

    Both runs continue from the checkpoints already in their folders, so a second call only re-tests.

    Args:
        out_dir: ``<out_dir>/nl_c2d`` and ``<out_dir>/c2d`` get each run's checkpoint, metrics and test scores;
            ``<out_dir>/results.md`` the table, ``<out_dir>/attention.png`` the non-local block's attention.
        config: the non-local recipe.
        baseline_config: the same recipe without non-local blocks.
        overrides: ``key=value`` overrides applied to both recipes (e.g. ``train.max_iter=300``).
        device: "cpu" or "cuda"; None picks CUDA when available.
        figure: draw the attention figure of the trained non-local model.

    Returns:
        {"runs": {"nl_c2d": {...}, "c2d": {...}}, "table": markdown, "figure": report or None}; each run has
        top1, checkpoint, params, train_s, test_s.
    """
    out = Path(out_dir)
    runs: dict[str, dict[str, Any]] = {}
    recipes: dict[str, DictConfig] = {}
    for name, recipe in (("nl_c2d", config), ("c2d", baseline_config)):
        cfg = recipes[name] = resolve_builtin(load_config(recipe, [*overrides, f"output_dir={out / name}"]))
        set_threads(cfg, device)
        runs[name] = train_and_test(cfg, device)
    cfg = recipes["nl_c2d"]
    views = f"{cfg.data.test_clips} clip(s) x {cfg.data.test_crops} crop(s)"
    lines = [
        f"Built-in set, {cfg.data.builtin.num_train} training clips, {cfg.train.max_iter} iterations of "
        f"{cfg.train.batch_size}, test on {cfg.data.builtin.num_test} held-out videos ({views} per video)",
        "",
        "| model | non-local blocks | params | top-1 (%) |",
        "|---|---|---|---|",
        f"| C2D | 0 | {runs['c2d']['params']:,} | {100 * runs['c2d']['top1']:.1f} |",
        f"| NL C2D | {_placement(cfg.model.overrides.get('nonlocal_blocks'))} | {runs['nl_c2d']['params']:,} | "
        f"{100 * runs['nl_c2d']['top1']:.1f} |",
    ]
    report = None
    if figure:
        report = builtin_attention_figure(runs["nl_c2d"]["checkpoint"], out / "attention.png")
        lines += [
            "",
            f"Attention ({report.block}, {out / 'attention.png'}): a query on the colour cue gives the object of "
            f"that colour more attention than any other object on {100 * report.object_choice:.0f} % of the "
            f"{report.multi_object_clips} test clips with several objects (an object at random: "
            f"{100 * report.object_chance:.0f} %); its single strongest key lies on that object in "
            f"{100 * report.on_target:.0f} % of {report.clips} clips (a random key: {100 * report.chance:.0f} %).",
        ]
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"NL C2D checkpoint: {runs['nl_c2d']['checkpoint']}")
    return {"runs": runs, "table": table, "figure": report}


def demo_seeds(
    out_dir: str | Path,
    seeds: Sequence[int],
    *,
    config: str | Path = DEFAULT_CONFIG,
    baseline_config: str | Path = BASELINE_CONFIG,
    overrides: Sequence[str] = (),
    device: str | None = None,
) -> dict[str, Any]:
    """`demo` once per training seed (``seed=S``, into ``<out_dir>/seed_S``); a table per seed with mean and min.

    The data set is the same for every seed (``data.builtin.seed``); a seed fixes the initial weights, the batch
    order and the augmentation of both networks. Seeds already run in ``out_dir`` are re-tested, not retrained.

    Returns:
        {"seeds": {seed: demo's result}, "table": markdown}; the table is also written to
        ``<out_dir>/seeds.md``.
    """
    if not seeds:
        raise ValueError("seeds must name at least one training seed, got none")
    out = Path(out_dir)
    results = {
        int(seed): demo(
            out / f"seed_{int(seed)}",
            config=config,
            baseline_config=baseline_config,
            overrides=[*overrides, f"seed={int(seed)}"],
            device=device,
        )
        for seed in seeds
    }
    rows = {
        seed: (
            100 * result["runs"]["c2d"]["top1"],
            100 * result["runs"]["nl_c2d"]["top1"],
            100 * result["figure"].object_choice,
        )
        for seed, result in results.items()
    }
    columns = list(zip(*rows.values(), strict=True))
    lines = [
        "| seed | C2D top-1 (%) | NL C2D top-1 (%) | cue attends most to the target (%) |",
        "|---|---|---|---|",
        *(f"| {seed} | {c2d:.1f} | {nl:.1f} | {hit:.0f} |" for seed, (c2d, nl, hit) in rows.items()),
        "| mean | " + " | ".join(f"{sum(c) / len(c):.1f}" for c in columns) + " |",
        "| min | " + " | ".join(f"{min(c):.1f}" for c in columns) + " |",
        "| max | " + " | ".join(f"{max(c):.1f}" for c in columns) + " |",
    ]
    table = "\n".join(lines)
    (out / "seeds.md").write_text(table + "\n", encoding="utf-8")
    print(f"\n{len(rows)} seeds:\n{table}")
    return {"seeds": results, "table": table}
