"""The built-in set's figure: the cue query, the object the label depends on, and the on-target count."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nlnet.cli import main
from nlnet.data.builtin import SceneObject
from nlnet.engine import save_checkpoint
from nlnet.models import nonlocal_blocks
from nlnet.viz import AttentionMap, load_model
from nlnet.viz.report import _attends_most_to, _builtin_to_shown, _covers_object

RECIPE = "builtin_nl_c2d"


def key_grid_map(span: tuple[float, float, float], grid: tuple[int, int, int], frames: int, size: int):
    centers = np.stack(
        np.meshgrid(*[(np.arange(n) + 0.5) * s - 0.5 for n, s in zip(grid, span, strict=True)], indexing="ij"), axis=-1
    )
    return AttentionMap(
        block="b", weights=np.full(grid, 1 / np.prod(grid)), key_centers=centers, key_span=span,
        query=(0.0, 0.0, 0.0), query_cell=(0, 0, 0), query_center=(0.0, 0.0, 0.0), query_span=span,
        frame_size=(frames, size, size),
    )


def test_keys_covering_the_target_object():
    # 8 frames of 32x32, keys of 2 frames x 16 x 16 pixels: a (4, 2, 2) grid. Cue in frames 0..3; the target
    # starts at (y, x) = (20, 6) in frame 4 and moves 3 pixels right per frame: frames 4..5 it is in key
    # column 0 (x 6, 9), frames 6..7 at x 12, 15: still column 0 (pixels 0..15). A faster one crosses.
    amap = key_grid_map((2.0, 16.0, 16.0), (4, 2, 2), 8, 32)
    identity = _builtin_to_shown(32, 32, 32)
    slow = SceneObject(shape=0, colour=0, quadrant=2, centre=(20.0, 6.0), velocity=(0.0, 3.0), radius=5.0)
    covers = _covers_object(amap, slow, 4, identity)
    expected = np.zeros((4, 2, 2), dtype=bool)
    expected[2, 1, 0] = expected[3, 1, 0] = True  # object phase only, bottom-left key
    np.testing.assert_array_equal(covers, expected)

    fast = SceneObject(shape=0, colour=0, quadrant=2, centre=(20.0, 6.0), velocity=(0.0, 6.0), radius=5.0)
    covers = _covers_object(amap, fast, 4, identity)
    expected = np.zeros((4, 2, 2), dtype=bool)
    expected[2, 1, 0] = True  # frames 4, 5: x = 6, 12
    expected[3, 1, 1] = True  # frames 6, 7: x = 18, 24
    np.testing.assert_array_equal(covers, expected)

    # Test-time resize 32 -> 64 then centre crop 48: generator pixel 20 -> (20.5 * 2 - 0.5) - 8 = 32.5.
    assert _builtin_to_shown(32, 64, 48)(20.0) == pytest.approx(32.5)


def test_the_object_with_the_most_attention_is_counted_whatever_the_top_key():
    # The (4, 2, 2) grid above: cue in frames 0..3 (key slices 0, 1), objects in frames 4..7 (slices 2, 3).
    # The target sits in the bottom-left key column, a distractor in the top-right one.
    amap = key_grid_map((2.0, 16.0, 16.0), (4, 2, 2), 8, 32)
    identity = _builtin_to_shown(32, 32, 32)
    target = SceneObject(shape=0, colour=0, quadrant=2, centre=(20.0, 6.0), velocity=(0.0, 0.0), radius=5.0)
    other = SceneObject(shape=1, colour=1, quadrant=1, centre=(6.0, 24.0), velocity=(0.0, 0.0), radius=5.0)
    weights = np.zeros((4, 2, 2))
    weights[0, 0, 0] = 0.5  # the strongest key is a cue cell
    weights[2, 1, 0] = weights[3, 1, 0] = 0.15  # 0.3 on the target's two cells
    weights[2, 0, 1] = 0.2  # 0.2 on the distractor's: less than the target's sum, more than either target cell
    amap = dataclasses.replace(amap, weights=weights)
    assert _attends_most_to(amap, [other, target], target, 4, identity)
    assert not _attends_most_to(amap, [other, target], other, 4, identity)
    assert _attends_most_to(amap, [target], target, 4, identity)  # alone, it is the one attended to
    weights[3, 0, 1] = 0.1  # now 0.3 each: a tie is no choice
    assert not _attends_most_to(dataclasses.replace(amap, weights=weights), [other, target], target, 4, identity)


def test_builtin_command_on_a_small_set_with_the_builtin_recipe(tmp_path, capsys):
    # The make-run recipe (tiny C2D, one non-local block in res3) on a 2 + 4 clip set. The checkpoint holds
    # weights only, so the recipe comes from --config with data.format: builtin, which is resolved into the
    # generated folder as training and testing resolve it.
    overrides = ["data.builtin.num_train=2", "data.builtin.num_test=4", f"data.builtin.cache_dir={tmp_path}"]
    model, recipe = load_model(None, config=RECIPE, overrides=overrides)
    assert recipe.data.format == "path_csv" and (Path(recipe.data.root) / "scenes_test.jsonl").is_file()
    checkpoint = tmp_path / "weights.pt"
    save_checkpoint(checkpoint, {"model": model.state_dict()})
    png = tmp_path / "builtin.png"
    assert main(["visualize", "--checkpoint", str(checkpoint), "--config", str(RECIPE), "--builtin",
                 "--out", str(png), *overrides]) == 0
    printed = capsys.readouterr().out
    (block,) = nonlocal_blocks(model)  # the recipe's one block, the figure's default (the last one)
    assert f"{block}: a query on the cue" in printed and "over all 4 clips" in printed and "a random key" in printed
    with Image.open(png) as image:
        # res3 of this model keeps 4 of the 8 frames (2 frames a key slice): 4 panels of 240 x 240 + title.
        assert image.size == (4 * 240, 240 + 40)
