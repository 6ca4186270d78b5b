"""``data.format: builtin`` in a recipe: `resolve_builtin` generates the set once and points ``data`` at its files.

The set is real (H.264 mp4 files written with PyAV); only its size is tiny (16 training clips, 8 test videos).
"""

from __future__ import annotations

from nlnet.data.builtin import SHAPES
from nlnet.engine.builtin import resolve_builtin
from nlnet.engine.config import load_config


def test_recipe_resolves_to_the_generated_set(tmp_path):
    toy = ["data.builtin.num_train=16", "data.builtin.num_test=8", f"data.builtin.cache_dir={tmp_path / 'cache'}"]
    cfg = resolve_builtin(load_config("builtin_nl_c2d", toy))
    folder = tmp_path / "cache"
    assert cfg.data.format == "path_csv"
    assert cfg.data.root.startswith(str(folder)) and cfg.data.num_classes == len(SHAPES)
    assert list(cfg.data.class_names) == list(SHAPES)
    rows = open(cfg.data.train_list).read().splitlines()
    assert rows[0] == "path,label" and len(rows) == 1 + 16
    assert len(open(cfg.data.test_list).read().splitlines()) == 1 + 8
    # Resolving again finds the same cached folder; other formats pass through untouched.
    assert resolve_builtin(load_config("builtin_nl_c2d", toy)).data.root == cfg.data.root
    assert resolve_builtin(load_config(None)).data.format == "kinetics_csv"
