"""Config loading: schema defaults, _base_ files, dotted overrides, validation, and every shipped recipe."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from nlnet.engine.config import available_recipes, load_config, recipe_path, recipes_dir
from nlnet.models import available, create

CONFIGS = sorted(recipes_dir().glob("*.yaml"))


def test_defaults_and_overrides():
    cfg = load_config(
        None, ["train.max_iter=12", "data.train_jitter_scales=[64,80]", "model.overrides.clip=8x8"]
    )
    assert cfg.train.max_iter == 12
    assert list(cfg.data.train_jitter_scales) == [64, 80]
    assert cfg.model.overrides.clip == "8x8"
    assert cfg.model.num_classes == cfg.data.num_classes == 400  # interpolated
    assert cfg.train.nesterov is True and cfg.train.weight_decay_bn == 0.0


def test_an_override_replaces_a_mapping_instead_of_merging_into_it():
    recipe = "builtin_nl_c2d"
    assert dict(load_config(recipe).model.overrides.nonlocal_blocks) == {"res3": [0]}
    cfg = load_config(recipe, ["model.overrides.nonlocal_blocks={res4: [0]}", "seed=2"])
    assert OmegaConf.to_container(cfg.model.overrides.nonlocal_blocks) == {"res4": [0]} and cfg.seed == 2
    cfg = load_config(recipe, ["model.overrides.nonlocal_blocks=null", "model.overrides.nonlocal_blocks=10"])
    assert cfg.model.overrides.nonlocal_blocks == 10  # in order: the last one wins
    with pytest.raises(ValueError, match="train.no_such_key"):
        load_config(recipe, ["train.no_such_key=1"])


def test_base_files_merge_in_order(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  max_iter: 5\n  base_lr: 0.5\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("_base_: ../a.yaml\ntrain:\n  max_iter: 7\n")
    cfg = load_config(tmp_path / "sub" / "b.yaml", ["train.base_lr=0.25"])
    assert (cfg.train.max_iter, cfg.train.base_lr) == (7, 0.25)
    (tmp_path / "a.yaml").write_text("_base_: sub/b.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.max_itr=5"], "train.max_itr"),
        (["train.max_iter"], "key=value"),
        (["train.steps=[0,10]", "train.lrs=[1]"], "same non-zero length"),
        (["train.steps=[5,10]", "train.lrs=[1,0.1]"], "start at 0"),
        (["train.amp=fp8"], "train.amp"),
        (["train.optimizer=adam"], "train.optimizer"),
        (["train.schedule=cosine"], "train.schedule"),
        (["train.warmup_fraction=1.0"], "train.warmup_fraction"),
        (["train.batch_size=0"], "batch_size"),
        (["model.freeze_bn=true"], "precise_bn=false"),
        (["train.max_iter={a: [}"], "invalid configuration"),
    ],
)
def test_bad_settings_are_rejected_with_the_key_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        load_config("no/such/recipe.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_recipe_loads_and_builds_its_model(path):
    cfg = load_config(path)
    assert cfg.model.name in available()
    # The recipe's model keywords are valid: build the recipe's own network, on the meta device (shapes only).
    with torch.device("meta"):
        create(
            cfg.model.name,
            num_classes=int(cfg.model.num_classes),
            dropout=float(cfg.model.dropout),
            **OmegaConf.to_container(cfg.model.overrides),
        )
    name = path.stem
    if name.startswith("base_"):
        return
    assert path.read_text().startswith("#"), "every recipe says which paper row it reproduces"
    if name.startswith("builtin_"):
        # The built-in set's recipes are not the paper's Kinetics recipe (see nlnet/configs/builtin_nl_c2d.yaml).
        assert cfg.data.format == "builtin" and (cfg.train.optimizer, cfg.train.schedule) == ("adamw", "onecycle")
        return
    clip = name.rsplit("_", 1)[-1]
    if name.startswith("kinetics_"):
        assert cfg.model.name == name[len("kinetics_") : -len(clip) - 1]
        frames, rate = map(int, clip.split("x"))
        assert (cfg.data.num_frames, cfg.data.sampling_rate) == (frames, rate)
        assert cfg.model.overrides.get("clip", "32x2") == ("8x8" if clip == "8x8" else "32x2")
    long_clip = cfg.data.num_frames == 128
    assert cfg.model.freeze_bn == long_clip and cfg.train.precise_bn == (not long_clip)
    if long_clip:
        assert cfg.model.overrides.nonlocal_norm is None and cfg.model.checkpoint
        assert cfg.train.batch_size == (8 if cfg.data.multi_label else 16)
    else:
        assert (cfg.train.batch_size, cfg.train.base_lr, list(cfg.train.steps)) == (
            64,
            0.01,
            [0, 150000, 300000],
        )
        assert cfg.model.pretrained_2d.endswith(f"resnet{cfg.model.name.rsplit('_r', 1)[-1]}_imagenet.pth")


def test_a_shipped_recipe_is_found_by_name_with_its_base():
    by_name = load_config("kinetics_nl_i3d_r50_8x8")
    assert by_name == load_config("kinetics_nl_i3d_r50_8x8.yaml")
    assert by_name == load_config(recipes_dir() / "kinetics_nl_i3d_r50_8x8.yaml")
    assert by_name.train.checkpoint_period == 10000 and by_name.data.num_frames == 8  # _base_, then the file
    assert "detection/shapes_maskrcnn_r50" in available_recipes() and "builtin_nl_c2d" in available_recipes()
    assert recipe_path("detection/shapes_maskrcnn_r50") == recipes_dir() / "detection" / "shapes_maskrcnn_r50.yaml"


def test_an_existing_path_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "builtin_nl_c2d").write_text("seed: 7\n")
    assert load_config("builtin_nl_c2d").seed == 7 and load_config("builtin_nl_c2d.yaml").data.format == "builtin"


def test_an_unknown_recipe_name_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="neither a file nor a shipped recipe.*kinetics_nl_i3d_r50_32x2"):
        load_config("kinetics_nl_i3d_r50_32x3")


def test_the_detection_schema_goes_through_the_same_loader(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  max_iter: 9\n")
    (tmp_path / "det.yaml").write_text("_base_: base.yaml\nmodel:\n  overrides:\n    min_size: 96\n")
    cfg = load_config(tmp_path / "det.yaml", ["train.gamma=0.5"], schema="detection")
    assert (cfg.train.max_iter, cfg.train.gamma, cfg.model.overrides.min_size) == (9, 0.5, 96)
    assert cfg.model.name == "maskrcnn_r50_fpn" and "steps" not in cfg.train  # not the video schema's keys
    with pytest.raises(ValueError, match="invalid detection configuration"):
        load_config(None, ["train.steps=[0]"], schema="detection")
    with pytest.raises(ValueError, match="schema must be one of"):
        load_config(None, schema="audio")
