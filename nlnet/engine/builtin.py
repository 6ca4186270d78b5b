"""The built-in data set in the engine: config resolution, the C2D vs NL C2D demo, and Table 2 in miniature.

``data.format: builtin`` in a recipe stands for the generated set of ``nlnet.data.builtin``: `resolve_builtin`
makes it once (``write_builtin``, cached under ``data.builtin.cache_dir``) and rewrites the data section into
the ``path_csv`` form the pipeline reads, so training and testing decode the set's real H.264 files with PyAV.
`train` and `test` of the engine call it; the checkpoint's stored recipe names the folder.

`demo` (``make run``, ``nlnet demo``) trains the same tiny C2D with and without a non-local block at equal
budget, tests both, keeps the checkpoints, draws the non-local block's attention and prints a top-1 table.
`ablate` (``nlnet ablate``) runs the axes of the paper's Table 2 on the same set and writes a markdown table
beside the paper's Kinetics numbers.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nlnet.engine.config import complete_config, load_config

__all__ = ["ABLATION_AXES", "AblationRow", "ablate", "demo", "format_ablation", "resolve_builtin"]

# Names of shipped recipes (nlnet/configs), found by nlnet.engine.config.recipe_path wherever nlnet is installed.
DEFAULT_CONFIG = "builtin_nl_c2d"
BASELINE_CONFIG = "builtin_c2d"


def resolve_builtin(cfg: DictConfig | Mapping[str, Any]) -> DictConfig:
    """Generates (or finds) the built-in set of a ``data.format: builtin`` recipe and points ``data`` at it.

    Other recipes are returned completed and otherwise unchanged.

    Args:
        cfg: a recipe; ``data.builtin`` holds ``num_train``, ``num_test``, ``seed`` and ``cache_dir`` (None:
            ``nlnet.data.builtin.default_cache_dir()``).

    Returns:
        A new config with ``data.format: path_csv``, ``data.root`` the set's folder, absolute
        ``train_list`` / ``val_list`` / ``test_list`` (validation uses the held-out test stream), ``num_classes``
        and ``class_names`` from the set's ``classes.txt``.
    """
    cfg = complete_config(cfg)
    if cfg.data.format != "builtin":
        return cfg
    from nlnet.data.builtin import write_builtin

    spec = cfg.data.builtin
    folder = write_builtin(
        spec.cache_dir,
        num_train=int(spec.num_train),
        num_test=int(spec.num_test),
        seed=int(spec.seed),
    )
    names = (folder / "classes.txt").read_text().split()
    cfg = cfg.copy()
    cfg.data.format = "path_csv"
    cfg.data.root = str(folder)
    cfg.data.train_list = str(folder / "train.csv")
    cfg.data.val_list = str(folder / "test.csv")
    cfg.data.test_list = str(folder / "test.csv")
    cfg.data.num_classes = len(names)
    cfg.data.class_names = names
    return cfg


def _set_threads(cfg: DictConfig, device: str | None) -> None:
    """On CPU, leave one core to each data-loading worker: decoding and the training step then overlap."""
    import torch

    if device == "cuda" or (device is None and torch.cuda.is_available()):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores - int(cfg.train.num_workers)))


def _count_parameters(cfg: DictConfig) -> int:
    from nlnet.engine.train import build_model

    model_cfg = cfg.model.copy()
    model_cfg.checkpoint = None
    model_cfg.pretrained_2d = None
    return sum(p.numel() for p in build_model(model_cfg).parameters())


def _train_and_test(cfg: DictConfig, device: str | None) -> dict[str, Any]:
    """Trains ``cfg`` (continuing from its output folder's latest checkpoint), tests the final checkpoint."""
    from nlnet.engine.evaluate import test
    from nlnet.engine.train import train

    start = time.perf_counter()
    result = train(cfg, resume=True, device=device)
    trained = time.perf_counter()
    tested = test(cfg, result["checkpoint"], device=device)
    return {
        "top1": float(tested["metrics"]["top1"]),
        "checkpoint": result["checkpoint"],
        "params": _count_parameters(cfg),
        "train_s": trained - start,
        "test_s": time.perf_counter() - trained,
    }


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
        _set_threads(cfg, device)
        runs[name] = _train_and_test(cfg, device)
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
        from nlnet.viz import builtin_attention_figure

        report = builtin_attention_figure(runs["nl_c2d"]["checkpoint"], out / "attention.png")
        lines += [
            "",
            f"Attention ({report.block}, {out / 'attention.png'}): for a query on the colour cue, the strongest "
            f"key lies on the object of that colour in {100 * report.on_target:.0f} % of {report.clips} test "
            f"clips (a random key: {100 * report.chance:.0f} %).",
        ]
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"NL C2D checkpoint: {runs['nl_c2d']['checkpoint']}")
    return {"runs": runs, "table": table, "figure": report}


# ----------------------------------------------------------------------------------------------- ablation


@dataclass(frozen=True)
class AblationRow:
    """One line of a miniature Table 2.

    Attributes:
        label: what the line shows, in the paper's words where there is an equivalent.
        run: name of the training run (shared by lines of different axes that are the same network).
        paper: the paper's Kinetics top-1 (%) of the corresponding line, R50 unless the axis says otherwise.
    """

    label: str
    run: str
    paper: float | None


# Model keys each run changes in the base recipe (nlnet/configs/builtin_nl_c2d.yaml: NL C2D, embedded Gaussian,
# spacetime extent). Values replace the base's (dictionaries are not merged). The single-block lines sit in res4
# as in the paper's Table 2a (the demo's recipe puts its block in res3; that network is the "res3" line).
_RES4 = {"model.overrides.nonlocal_blocks": {"res4": [0]}}
ABLATION_RUNS: dict[str, dict[str, Any]] = {
    "c2d": {"model.overrides.nonlocal_blocks": None},
    "nl_c2d": _RES4,
    "gaussian": {**_RES4, "model.overrides.nonlocal_mode": "gaussian"},
    "dot_product": {**_RES4, "model.overrides.nonlocal_mode": "dot_product"},
    "concatenation": {**_RES4, "model.overrides.nonlocal_mode": "concatenation"},
    "res2": {"model.overrides.nonlocal_blocks": {"res2": [0]}},
    "res3": {"model.overrides.nonlocal_blocks": {"res3": [0]}},
    "res5": {"model.overrides.nonlocal_blocks": {"res5": [0]}},
    "blocks2": {"model.overrides.nonlocal_blocks": {"res3": [0], "res4": [0]}},
    "blocks4": {"model.overrides.nonlocal_blocks": {"res2": [0], "res3": [0], "res4": [0], "res5": [0]}},
    "space": {**_RES4, "model.overrides.nonlocal_extent": "space"},
    "time": {**_RES4, "model.overrides.nonlocal_extent": "time"},
    "i3d": {"model.name": "i3d_r50", "model.overrides.nonlocal_blocks": None},
    "nl_i3d": {**_RES4, "model.name": "i3d_r50"},
}

ABLATION_AXES: dict[str, tuple[str, list[AblationRow]]] = {
    "instantiation": (
        "(a) instantiations: 1 block in res4 (paper: Table 2a, R50, 1 block)",
        [
            AblationRow("C2D baseline", "c2d", 71.8),
            AblationRow("Gaussian", "gaussian", 72.5),
            AblationRow("Gaussian, embed", "nl_c2d", 72.7),
            AblationRow("dot-product", "dot_product", 72.9),
            AblationRow("concatenation", "concatenation", 72.8),
        ],
    ),
    "stage": (
        "(b) stage: 1 block (paper: Table 2b, R50)",
        [
            AblationRow("baseline", "c2d", 71.8),
            AblationRow("res2", "res2", 72.7),
            AblationRow("res3", "res3", 72.9),
            AblationRow("res4", "nl_c2d", 72.7),
            AblationRow("res5", "res5", 72.3),
        ],
    ),
    "blocks": (
        "(c) number of blocks: the tiny net has one residual block per stage, so 1 / 2 / 4 blocks stand for the "
        "paper's 1 / 5 / 10 (paper: Table 2c, R50)",
        [
            AblationRow("baseline", "c2d", 71.8),
            AblationRow("1 block (res4) ~ 1-block", "nl_c2d", 72.7),
            AblationRow("2 blocks (res3, res4) ~ 5-block", "blocks2", 73.8),
            AblationRow("4 blocks (res2-res5) ~ 10-block", "blocks4", 74.3),
        ],
    ),
    "extent": (
        "(d) space vs time vs spacetime: 1 block in res4 (paper: Table 2d, R50, 5 blocks)",
        [
            AblationRow("baseline", "c2d", 71.8),
            AblationRow("space-only", "space", 72.9),
            AblationRow("time-only", "time", 73.1),
            AblationRow("spacetime", "nl_c2d", 73.8),
        ],
    ),
    "conv3d": (
        "(e, f) non-local vs 3D convolution: I3D = the same net with I3D3x1x1 inflation, NL = 1 block in res4 "
        "(paper: Table 2f, R50, 5 blocks; NL C2D from Table 2c)",
        [
            AblationRow("C2D baseline", "c2d", 71.8),
            AblationRow("I3D", "i3d", 73.3),
            AblationRow("NL C2D", "nl_c2d", 73.8),
            AblationRow("NL I3D", "nl_i3d", 74.9),
        ],
    ),
}


def _run_key(run: str, seed: int) -> str:
    return f"{run}_s{seed}"


def format_ablation(results: Mapping[str, Mapping[str, Any]], axes: Sequence[str], seeds: Sequence[int]) -> str:
    """The markdown tables of ``axes``: miniature top-1 (mean and range over seeds) beside the paper's.

    Args:
        results: ``{"<run>_s<seed>": {"top1", "params", ...}}`` as written by `ablate`; lines without results
            are marked "not run".
        axes: names of `ABLATION_AXES`.
        seeds: the training seeds asked for.
    """
    lines = []
    for axis in axes:
        title, rows = ABLATION_AXES[axis]
        lines += [f"**{title}**", "", "| model | params | built-in top-1 (%) | paper top-1 (%) |", "|---|---|---|---|"]
        for row in rows:
            done = [results[_run_key(row.run, s)] for s in seeds if _run_key(row.run, s) in results]
            paper = "-" if row.paper is None else f"{row.paper:.1f}"
            if not done:
                lines.append(f"| {row.label} | | not run | {paper} |")
                continue
            scores = [100 * float(r["top1"]) for r in done]
            mean = sum(scores) / len(scores)
            cell = f"{mean:.1f}"
            if len(scores) > 1:
                cell += f" ({min(scores):.1f}-{max(scores):.1f}, {len(scores)} seeds)"
            elif len(seeds) > 1:
                cell += f" (1 of {len(seeds)} seeds)"
            lines.append(f"| {row.label} | {int(done[0]['params']):,} | {cell} | {paper} |")
        lines.append("")
    return "\n".join(lines)


@dataclass
class _Ablation:
    out: Path
    axes: list[str]
    seeds: list[int]
    header: str
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def write(self) -> str:
        table = self.header + "\n\n" + format_ablation(self.results, self.axes, self.seeds)
        for name, text in (
            ("ablation.md", table),
            ("ablation.json", json.dumps({"axes": self.axes, "seeds": self.seeds, "runs": self.results}, indent=1)),
        ):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text + "\n", encoding="utf-8")
            tmp.replace(self.out / name)
        return table


def ablate(
    out_dir: str | Path = "runs/builtin_ablation",
    *,
    axes: Sequence[str] | None = None,
    seeds: int = 1,
    config: str | Path = DEFAULT_CONFIG,
    overrides: Sequence[str] = (),
    device: str | None = None,
) -> str:
    """Trains and tests every network of the chosen Table 2 axes on the built-in set; writes the table.

    Every run uses the base recipe (same data, budget and optimiser), changing only the model keys of
    `ABLATION_RUNS`; a network shared by several axes (the baseline, the res4 embedded-Gaussian block) is
    trained once per seed. Results are saved after every run (``ablation.json``, ``ablation.md``) and runs
    already there are reused, so an interrupted ablation continues where it stopped.

    Args:
        out_dir: ``<out_dir>/runs/<run>_s<seed>`` per run, plus ``ablation.md`` and ``ablation.json``.
        axes: names of `ABLATION_AXES` (default: all, in the paper's order).
        seeds: training seeds 0 .. seeds-1 (initialisation and batch order; the data set is fixed).
        config: the base recipe.
        overrides: ``key=value`` overrides applied to every run (e.g. ``train.max_iter=500``).
        device: "cpu" or "cuda"; None picks CUDA when available.

    Returns:
        The markdown written to ``ablation.md``.
    """
    axes = list(ABLATION_AXES) if axes is None else list(axes)
    unknown = [a for a in axes if a not in ABLATION_AXES]
    if unknown or not axes:
        raise ValueError(f"axes must be a non-empty subset of {list(ABLATION_AXES)}, got {list(axes)}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = resolve_builtin(load_config(config, overrides))
    _set_threads(base, device)
    runs = list(dict.fromkeys(row.run for axis in axes for row in ABLATION_AXES[axis][1]))
    header = (
        f"Table 2 in miniature on the built-in set ({base.data.builtin.num_train} training clips, "
        f"{base.data.builtin.num_test} held-out test videos, {base.data.test_clips} clip(s) x "
        f"{base.data.test_crops} crop(s) per video). The base network is {base.model.name} with one residual "
        f"block per stage, width {base.model.overrides.get('base_width')} and one non-local block in res4; each "
        f"line changes only what it names. Every network is trained {base.train.max_iter} iterations "
        f"of {base.train.batch_size} clips ({base.train.optimizer}, {base.train.schedule}, lr "
        f"{base.train.base_lr}); seeds {list(range(seeds))}. Paper: Kinetics-400 validation top-1."
    )
    state = _Ablation(out, axes, list(range(seeds)), header)
    saved = out / "ablation.json"
    if saved.is_file():
        state.results.update(json.loads(saved.read_text())["runs"])
    state.write()
    for seed in range(seeds):
        for run in runs:
            key = _run_key(run, seed)
            if key in state.results:
                continue
            cfg = base.copy()
            cfg.seed = seed
            cfg.output_dir = str(out / "runs" / key)
            for dotted, value in ABLATION_RUNS[run].items():
                OmegaConf.update(cfg, dotted, value, merge=False)
            result = _train_and_test(complete_config(cfg), device)
            state.results[key] = result
            print(f"{key}: top-1 {100 * result['top1']:.1f} % ({result['train_s']:.0f} s training)", flush=True)
            state.write()
    table = state.write()
    print(table)
    return table
