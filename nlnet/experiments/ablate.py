"""The paper's Table 2 in miniature on the built-in set (``nlnet ablate``).

`ablate` trains and tests the networks of each chosen axis (instantiation, stage, number of blocks, extent,
3D convolution) with one base recipe and writes a markdown table beside the paper's Kinetics-400 numbers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from nlnet.engine.builtin import DEFAULT_CONFIG, resolve_builtin
from nlnet.engine.config import complete_config, load_config
from nlnet.experiments.demo import _placement
from nlnet.experiments.runs import set_threads, train_and_test
from nlnet.models.registry import _DEFAULTS as MODEL_DEFAULTS
from nlnet.utils.io import atomic_write

__all__ = ["ABLATION_AXES", "ABLATION_RUNS", "AblationRow", "ablate", "format_ablation"]


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


# Model keys each run changes in the base recipe (nlnet/configs/builtin_nl_c2d.yaml: NL C2D, one embedded-Gaussian
# block in res3 whose keys are max-pooled 1x2x2, spacetime extent). Values replace the base's (dictionaries are not
# merged). The base network is the demo's, so "nl_c2d" changes nothing. Res4 and res5 grids are 2 x 2 and 1 x 1 at
# 32 pixels, too small to pool, so every run with a block there attends to unpooled keys.
_NO_POOL = {"model.overrides.nonlocal_pool": None}
ABLATION_RUNS: dict[str, dict[str, Any]] = {
    "c2d": {"model.overrides.nonlocal_blocks": None},
    "nl_c2d": {},
    "gaussian": {"model.overrides.nonlocal_mode": "gaussian"},
    "dot_product": {"model.overrides.nonlocal_mode": "dot_product"},
    "concatenation": {"model.overrides.nonlocal_mode": "concatenation"},
    "res2": {"model.overrides.nonlocal_blocks": {"res2": [0]}},
    "res3_unpooled": _NO_POOL,
    "res4": {"model.overrides.nonlocal_blocks": {"res4": [0]}, **_NO_POOL},
    "res5": {"model.overrides.nonlocal_blocks": {"res5": [0]}, **_NO_POOL},
    "blocks2": {"model.overrides.nonlocal_blocks": {"res3": [0], "res4": [0]}, **_NO_POOL},
    "blocks4": {"model.overrides.nonlocal_blocks": {"res2": [0], "res3": [0], "res4": [0], "res5": [0]}, **_NO_POOL},
    "space": {"model.overrides.nonlocal_extent": "space"},
    "time": {"model.overrides.nonlocal_extent": "time"},
    "i3d": {"model.name": "i3d_r50", "model.overrides.nonlocal_blocks": None},
    "nl_i3d": {"model.name": "i3d_r50"},
}

ABLATION_AXES: dict[str, tuple[str, list[AblationRow]]] = {
    "instantiation": (
        "(a) instantiations: 1 block in res3 (paper: Table 2a, R50, 1 block in res4)",
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
            AblationRow("res3", "nl_c2d", 72.9),
            AblationRow("res3, keys not pooled", "res3_unpooled", None),
            AblationRow("res4 (keys not pooled)", "res4", 72.7),
            AblationRow("res5 (keys not pooled)", "res5", 72.3),
        ],
    ),
    "blocks": (
        "(c) number of blocks: the tiny net has one residual block per stage, so 1 / 2 / 4 blocks stand for the "
        "paper's 1 / 5 / 10 (paper: Table 2c, R50)",
        [
            AblationRow("baseline", "c2d", 71.8),
            AblationRow("1 block (res3) ~ 1-block", "nl_c2d", 72.7),
            AblationRow("2 blocks (res3, res4; keys not pooled) ~ 5-block", "blocks2", 73.8),
            AblationRow("4 blocks (res2-res5; keys not pooled) ~ 10-block", "blocks4", 74.3),
        ],
    ),
    "extent": (
        "(d) space vs time vs spacetime: 1 block in res3 (paper: Table 2d, R50, 5 blocks)",
        [
            AblationRow("baseline", "c2d", 71.8),
            AblationRow("space-only", "space", 72.9),
            AblationRow("time-only", "time", 73.1),
            AblationRow("spacetime", "nl_c2d", 73.8),
        ],
    ),
    "conv3d": (
        "(e, f) non-local vs 3D convolution: I3D = the same net with I3D3x1x1 inflation, NL = 1 block in res3 "
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
        ranges: dict[str, tuple[float, float]] = {}
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
                ranges[row.label] = (min(scores), max(scores))
            elif len(seeds) > 1:
                cell += f" (1 of {len(seeds)} seeds)"
            lines.append(f"| {row.label} | {int(done[0]['params']):,} | {cell} | {paper} |")
        lines += ["", *_overlaps(ranges)]
    return "\n".join(lines)


def _overlaps(ranges: Mapping[str, tuple[float, float]]) -> list[str]:
    """A line naming the pairs of rows whose seed ranges (min-max) overlap: their difference is within noise."""
    labels = list(ranges)
    pairs = [
        f"{a} ~ {b}"
        for i, a in enumerate(labels)
        for b in labels[i + 1 :]
        if ranges[a][0] <= ranges[b][1] and ranges[b][0] <= ranges[a][1]
    ]
    if len(labels) < 2:
        return []
    if not pairs:
        return ["No two seed ranges overlap: every difference on this axis exceeds the run-to-run spread.", ""]
    return [f"Within noise (seed ranges overlap): {'; '.join(pairs)}.", ""]


@dataclass
class _Ablation:
    out: Path
    axes: list[str]
    seeds: list[int]
    header: str
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def write(self) -> str:
        table = self.header + "\n\n" + format_ablation(self.results, self.axes, self.seeds)
        document = json.dumps({"axes": self.axes, "seeds": self.seeds, "runs": self.results}, indent=1)
        atomic_write(self.out / "ablation.md", lambda handle: handle.write((table + "\n").encode("utf-8")))
        atomic_write(self.out / "ablation.json", lambda handle: handle.write((document + "\n").encode("utf-8")))
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
    `ABLATION_RUNS`; a network shared by several axes (the baseline, the res3 embedded-Gaussian block) is
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
    set_threads(base, device)
    runs = list(dict.fromkeys(row.run for axis in axes for row in ABLATION_AXES[axis][1]))
    pool = base.model.overrides.get("nonlocal_pool", MODEL_DEFAULTS["nonlocal_pool"])
    keys = "keys not pooled" if pool is None else f"keys max-pooled {'x'.join(map(str, pool))}"
    header = (
        f"Table 2 in miniature on the built-in set ({base.data.builtin.num_train} training clips, "
        f"{base.data.builtin.num_test} held-out test videos, {base.data.test_clips} clip(s) x "
        f"{base.data.test_crops} crop(s) per video). The base network is {base.model.name} with one residual "
        f"block per stage, width {base.model.overrides.get('base_width')} and non-local blocks "
        f"{_placement(base.model.overrides.get('nonlocal_blocks'))} ({keys}; lines with a block in res4 or res5 "
        "do not pool); each line changes only what it names. Every network is trained "
        f"{base.train.max_iter} iterations of {base.train.batch_size} clips ({base.train.optimizer}, "
        f"{base.train.schedule}, lr {base.train.base_lr}); seeds {list(range(seeds))}. "
        "Paper: Kinetics-400 validation top-1."
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
            result = train_and_test(complete_config(cfg), device)
            state.results[key] = result
            print(f"{key}: top-1 {100 * result['top1']:.1f} % ({result['train_s']:.0f} s training)", flush=True)
            state.write()
    table = state.write()
    print(table)
    return table
