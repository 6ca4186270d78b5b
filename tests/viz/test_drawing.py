"""PNG figures and GIFs of attention maps from a hand-built block (see ``coded_block_model``)."""

from __future__ import annotations

import numpy as np
import torch
from coded_block_model import CodedBlockModel, flat
from PIL import Image

from nlnet.viz import attention_map, save_attention


def test_png_and_gif_files(tmp_path):
    grid = (2, 4, 4)
    model = CodedBlockModel(grid, {flat((1, 2, 0), grid): flat((0, 1, 3), grid)}, (1, 2, 2))
    frames = torch.zeros(1, 3, 8, 32, 48)
    amap = attention_map(model, frames, query=(5, 20, 3))
    pictures = np.random.default_rng(0).integers(0, 256, (8, 32, 48, 3), dtype=np.uint8)
    for style in ("heatmap", "arrows"):
        png = save_attention(amap, pictures, tmp_path / f"{style}.png", style=style, panel_width=120)
        with Image.open(png) as image:
            # One panel per key slice (2), 120 pixels wide; 120 * 32 / 48 = 80 high plus a 40-pixel title.
            assert image.format == "PNG" and image.size == (240, 120)
    gif = save_attention(amap, pictures, tmp_path / "clip.gif", gif_scale=2)
    with Image.open(gif) as image:
        assert image.format == "GIF" and image.n_frames == 8 and image.size == (96, 64)
