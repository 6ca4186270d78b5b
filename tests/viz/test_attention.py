"""Attention maps of hand-built non-local blocks whose attention is known by construction.

Each test model feeds its block one-hot position codes at a fixed feature grid, whatever the frames are; the
frame size alone sets the stride. θ sends every query's code to the code of a chosen target position and φ is
the identity, so with a large code amplitude each query puts (almost) all its weight on the key cell whose
pooling window contains its target. The expected pixel centres below are written out from the pixel ranges
each key cell covers, not from the library's formula.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from coded_block_model import AMPLITUDE, CodedBlockModel, flat, midpoint
from torch import nn

from nlnet import NonLocalBlock
from nlnet.viz import attention_map, auto_query, block_attention, query_dependence, save_attention


@pytest.mark.parametrize("pool_position", ["before", "after"])
def test_3d_pooled_top_key_pixel_centre(pool_position):
    # Features (T, H, W) = (2, 4, 4) from 8 frames of 32x32: a feature cell is 4 frames x 8 x 8 pixels.
    # Keys pooled (1, 2, 2): key grid (2, 2, 2), a key cell is 4 frames x 16 x 16 pixels.
    grid = (2, 4, 4)
    query_cell, target = (1, 2, 0), (0, 1, 3)
    model = CodedBlockModel(grid, {flat(query_cell, grid): flat(target, grid)}, (1, 2, 2), pool_position)
    frames = torch.zeros(1, 3, 8, 32, 32)
    # Frame 5 is in time cell 1, row 20 in row cell 2, column 3 in column cell 0.
    amap = attention_map(model, frames, query=(5, 20, 3), block="block")

    assert amap.query_cell == query_cell
    assert amap.weights.shape == (2, 2, 2)
    assert np.unravel_index(amap.weights.argmax(), amap.weights.shape) == (0, 0, 1)
    assert amap.weights.max() > 0.999
    weight, center = amap.top_keys(1)[0]
    # Target (0, 1, 3) lies in key (0, 0, 1): frames 0..3, rows 0..15, columns 16..31.
    assert center == pytest.approx((midpoint(0, 3), midpoint(0, 15), midpoint(16, 31)))
    assert weight == pytest.approx(float(amap.weights.max()))
    # The query's own cell: frames 4..7, rows 16..23, columns 0..7.
    assert amap.query_center == pytest.approx((midpoint(4, 7), midpoint(16, 23), midpoint(0, 7)))


def test_3d_unpooled_and_every_query():
    # No pooling: keys are the feature cells, 2 frames x 4 x 4 pixels each from 4 frames of 16x12.
    grid = (2, 4, 3)
    rng = np.random.default_rng(0)
    positions = math.prod(grid)
    targets = dict(enumerate(rng.permutation(positions).tolist()))
    model = CodedBlockModel(grid, targets, None)
    frames = torch.randn(3, 4, 16, 12)  # unbatched clip
    for source, target in targets.items():
        qt, qy, qx = np.unravel_index(source, grid)
        amap = attention_map(model, frames, query=(2 * qt + 1, 4 * qy + 3, 4 * qx), block="block")
        assert amap.query_cell == (qt, qy, qx)
        tt, ty, tx = np.unravel_index(target, grid)
        _, center = amap.top_keys(1)[0]
        expected = (midpoint(2 * tt, 2 * tt + 1), midpoint(4 * ty, 4 * ty + 3), midpoint(4 * tx, 4 * tx + 3))
        assert center == pytest.approx(expected)


def test_2d_fractional_stride_and_floor_pooling():
    # Features (H, W) = (5, 4) from a 36x32 image: a feature cell is 7.2 x 8 pixels. Pool 2x2 floors the
    # key grid to (2, 2): key rows cover feature rows {0,1} and {2,3}; feature row 4 (pixels 29..35) is
    # in no key. Pixel c is in feature row floor((c + 0.5) / 7.2): rows 0..13 -> key row 0, 14..28 -> 1.
    grid = (5, 4)
    query_cell, target = (4, 1), (3, 2)
    model = CodedBlockModel(grid, {flat(query_cell, grid): flat(target, grid)}, 2)
    image = torch.zeros(1, 3, 36, 32)
    amap = attention_map(model, image, query=(33, 10), block="block")

    assert amap.query_cell == (0, 4, 1)
    assert amap.weights.shape == (1, 2, 2)
    _, center = amap.top_keys(1)[0]
    # Target (3, 2) -> key (1, 1): feature rows 2..3 = [14.4, 28.8) -> key row span 14.4 pixels, centre
    # 1.5 * 14.4 - 0.5; columns: feature columns 2..3 = pixels 16..31.
    assert center == pytest.approx((0.0, 1.5 * 14.4 - 0.5, midpoint(16, 31)))
    heat = amap.upsampled()
    assert heat.shape == (1, 36, 32)
    rows, columns = np.nonzero(heat[0] > 0.5)
    assert (rows.min(), rows.max(), columns.min(), columns.max()) == (14, 28, 16, 31)
    assert np.all(heat[0, 29:] == 0)  # pixels of the dropped feature row belong to no key


def test_query_independent_block_has_zero_distance_and_dependent_block_does_not():
    grid = (2, 4, 4)
    positions = math.prod(grid)
    independent = CodedBlockModel(grid, None, (1, 2, 2))
    with torch.no_grad():
        # θ ignores its input: every query has the same θ vector, so the same attention row.
        independent.block.theta.bias.copy_(torch.linspace(-1, 1, positions) * AMPLITUDE / 4)
    frames = torch.zeros(1, 3, 8, 32, 32)
    rows = block_attention(independent, frames)["block"]
    assert rows.shape == (positions, 8)
    assert not torch.allclose(rows[0], torch.full_like(rows[0], 1 / 8))  # not trivially uniform
    assert query_dependence(independent, frames, num_queries=16)["block"] == pytest.approx(0.0, abs=1e-9)

    # Queries sent to the targets of a shuffle: rows are one-hot on different keys for most pairs.
    targets = dict(enumerate(np.random.default_rng(1).permutation(positions).tolist()))
    dependent = CodedBlockModel(grid, targets, (1, 2, 2))
    rows = block_attention(dependent, frames)["block"]
    one_hot_keys = rows.argmax(1)
    same = (one_hot_keys[:, None] == one_hot_keys[None, :]).double()
    expected = 1 - (same.sum() - positions) / (positions * (positions - 1))  # all queries, all pairs
    distance = query_dependence(dependent, [frames, frames], num_queries=positions)["block"]
    assert distance == pytest.approx(float(expected), abs=1e-3)


def test_bad_arguments_raise_value_error():
    model = CodedBlockModel((2, 4, 4), None, None)
    frames = torch.zeros(1, 3, 8, 32, 32)
    with pytest.raises(ValueError, match="outside the frames"):
        attention_map(model, frames, query=(8, 0, 0))
    with pytest.raises(ValueError, match="no non-local block named"):
        attention_map(model, frames, query=(0, 0, 0), block="res9")
    with pytest.raises(ValueError, match="expected a sample"):
        attention_map(model, torch.zeros(2, 3, 8, 32, 32), query=(0, 0, 0))
    with pytest.raises(ValueError, match="num_queries"):
        query_dependence(model, frames, num_queries=1)
    amap = attention_map(model, frames, query=(0, 0, 0))
    with pytest.raises(ValueError, match=r"\.png or \.gif"):
        save_attention(amap, np.zeros((8, 32, 32, 3), np.uint8), "out.jpg")
    with pytest.raises(ValueError, match="frames must be uint8"):
        save_attention(amap, np.zeros((4, 32, 32, 3), np.uint8), "out.png")


def test_auto_query_motion_and_attended():
    grid = (2, 4, 4)
    model = CodedBlockModel(grid, None, (1, 2, 2))
    frames = torch.zeros(1, 3, 8, 32, 32)
    frames[0, :, 5, 16:24, 8:16] = 1.0  # a patch flashes in frame 5 (time cell 1), rows 16..23, columns 8..15
    assert auto_query(model, frames, strategy="motion") == attention_map(model, frames, None).query
    amap = attention_map(model, frames, None, auto="motion")
    assert amap.query_cell == (1, 2, 1)

    with torch.no_grad():
        # Query-independent logits that grow with the key's position codes: the last key (t'=1, y'=1, x'=1)
        # gets the most attention from every query, so "attended" puts the query inside it.
        model.block.theta.bias.copy_(torch.linspace(-1, 1, math.prod(grid)) * AMPLITUDE / 4)
    t, y, x = attention_map(model, frames, None, auto="attended").query
    assert 4 <= t < 8 and 16 <= y < 32 and 16 <= x < 32
    with pytest.raises(ValueError, match="auto must be one of"):
        attention_map(model, frames, None, auto="random")


class MemoryModel(nn.Module):
    """A 2D block whose queries (2x2 grid) read keys from a finer 4x4 memory, each query a chosen key."""

    def __init__(self, targets: dict[int, int], keyword: bool):
        super().__init__()
        keys = 16
        x_codes = torch.zeros(1, keys, 2, 2)
        for query, target in targets.items():
            x_codes[0, target, query // 2, query % 2] = AMPLITUDE
        self.register_buffer("x_codes", x_codes)
        self.register_buffer("memory", torch.eye(keys).reshape(1, keys, 4, 4) * AMPLITUDE)
        self.block = NonLocalBlock(keys, keys, dim=2, pool=None, norm=None)
        self.keyword = keyword
        with torch.no_grad():
            for conv in (self.block.theta, self.block.phi):
                conv.weight.copy_(torch.eye(keys).reshape(conv.weight.shape))
                conv.bias.zero_()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.keyword:
            return self.block(self.x_codes, memory=self.memory).mean()
        return self.block(self.x_codes, self.memory).mean()


@pytest.mark.parametrize("keyword", [False, True])
def test_keys_from_memory_use_the_memory_grid(keyword):
    # 32x32 image: queries on a 2x2 grid (16 pixels a cell), keys on the 4x4 memory (8 pixels a cell).
    targets = {0: 15, 1: 4, 2: 9, 3: 2}
    model = MemoryModel(targets, keyword)
    image = torch.zeros(1, 3, 32, 32)
    for query, target in targets.items():
        qy, qx = divmod(query, 2)
        amap = attention_map(model, image, (16 * qy + 5, 16 * qx + 9))
        assert amap.query_cell == (0, qy, qx)
        assert amap.weights.shape == (1, 4, 4)
        ty, tx = divmod(target, 4)
        _, center = amap.top_keys(1)[0]
        assert center == pytest.approx((0.0, midpoint(8 * ty, 8 * ty + 7), midpoint(8 * tx, 8 * tx + 7)))
