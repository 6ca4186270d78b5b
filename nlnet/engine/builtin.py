"""The built-in data set in a recipe: ``data.format: builtin`` resolved to the generated set's files.

``data.format: builtin`` in a recipe stands for the generated set of ``nlnet.data.builtin``: `resolve_builtin`
makes it once (``write_builtin``, cached under ``data.builtin.cache_dir``) and rewrites the data section into
the ``path_csv`` form the pipeline reads, so training and testing decode the set's real H.264 files with PyAV.
`train` and `test` of the engine call it; the checkpoint's stored recipe names the folder. The studies on this
set (``nlnet demo``, ``nlnet ablate``) live in `nlnet.experiments`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig

from nlnet.engine.config import complete_config

__all__ = ["BASELINE_CONFIG", "DEFAULT_CONFIG", "resolve_builtin"]

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
