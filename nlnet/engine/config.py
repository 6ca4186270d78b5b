"""Training and testing configuration: a schema of defaults, YAML recipes and dotted ``key=value`` overrides.

A recipe is a YAML file, named by its path or, for the recipes shipped in ``nlnet/configs``, by its name
(``kinetics_nl_i3d_r50_32x2``, ``detection/shapes_maskrcnn_r50``): :func:`recipe_path`. A recipe file may name
other recipe files it builds on with ``_base_`` (a path relative to the file, or a list of them); they are
merged first, in order, then the file itself, then the command-line overrides. Each task has a schema, the
complete set of its keys with their defaults: :data:`DEFAULTS` for video classification, :data:`DETECTION_DEFAULTS`
for detection (``load_config(..., schema="detection")``). A misspelt key in a file or an override is an error,
not a silently ignored setting. ``model.overrides`` is the one open mapping; it is forwarded to the model's
constructor (``nlnet.models.create``).

A checkpoint knows its recipe (:func:`recipe_of_checkpoint`), so testing, evaluating and drawing need only it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "DEFAULTS",
    "DETECTION_DEFAULTS",
    "SCHEMAS",
    "available_recipes",
    "complete_config",
    "load_config",
    "read_recipe",
    "recipe_of_checkpoint",
    "recipe_path",
    "recipes_dir",
    "validate_config",
    "validate_detection_config",
]

DEFAULTS: dict[str, Any] = {
    # Seed of everything random: sampler order, augmentation, initialisation, dropout.
    "seed": 0,
    # Checkpoints, metrics.jsonl, TensorBoard events and test results go here.
    "output_dir": "runs/default",
    "model": {
        "name": "nl_i3d_r50",
        "num_classes": "${data.num_classes}",
        # Dropout after global pooling (paper: 0.5).
        "dropout": 0.5,
        # ImageNet 2D weights to inflate (forwarded to nlnet.models.create as ``pretrained_2d``).
        "pretrained_2d": None,
        # A checkpoint to start from: an nlnet checkpoint or a converted official state dict. Tensors whose
        # shape differs (e.g. a 400-way classifier when fine-tuning to 157 classes) are left at their init.
        "checkpoint": None,
        # BN as a frozen affine transform (long-clip recipe): eval-mode BN, parameters not trained.
        "freeze_bn": False,
        # Synchronised BN across processes; CUDA only. The paper keeps BN statistics per device.
        "sync_bn": False,
        # Any other keyword argument of nlnet.models.create (e.g. nonlocal_norm: null, stage_blocks).
        "overrides": {},
    },
    # Passed to nlnet.data.build_dataset unchanged, except format "builtin" (see nlnet.engine.builtin).
    "data": {
        "format": "kinetics_csv",
        "root": "data/kinetics",
        "train_list": "train.csv",
        "val_list": "val.csv",
        "test_list": "val.csv",
        "num_classes": 400,
        "multi_label": False,
        "num_frames": 32,
        "sampling_rate": 2,
        "train_jitter_scales": [256, 320],
        "train_crop": 224,
        "test_scale": 256,
        "test_crop": 256,
        "test_clips": 10,
        "test_crops": 3,
        # Pixel units, RGB: (x - 114.75) / 57.375 as in the official code.
        "mean": [114.75, 114.75, 114.75],
        "std": [57.375, 57.375, 57.375],
        # Validation during training: "center" (one middle clip, centre crop) or "train_like" (the training
        # augmentation, as in the paper's curves).
        "val_mode": "center",
        # Where the training augmentation (scale jitter, crop, flip, normalisation) runs: "worker" (the loader
        # workers) or "device" (workers decode and draw only; the training device cuts the clips, batched).
        "augment_on": "worker",
        # Class names in index order; null: the sorted names found in the training annotations.
        "class_names": None,
        # format "builtin": the generated set (nlnet.data.builtin.write_builtin) is made or found in the
        # cache folder (null: nlnet.data.builtin.default_cache_dir()) and fills in root, the lists,
        # num_classes and class_names.
        "builtin": {"num_train": 8000, "num_test": 1000, "seed": 0, "cache_dir": None},
        # Decode every training video once, before the first epoch, and cut all training clips from the kept
        # uint8 frames (nlnet.data.cache: same clips, memory = the decoded set); for small sets of short videos.
        "cache_decoded": False,
        # Processes for that one decode (null: train.num_workers). The training loader keeps train.num_workers:
        # once the frames are in memory, cutting a small clip can cost less than sending it from a worker.
        "cache_workers": None,
    },
    "train": {
        # Global batch (all processes together); each process takes batch_size / world_size clips.
        "batch_size": 64,
        "max_iter": 400000,
        "base_lr": 0.01,
        # "sgd" (the paper: momentum, nesterov, coupled L2) or "adamw" (decoupled weight decay).
        "optimizer": "sgd",
        # "steps" (the paper's steps_with_relative_lrs below) or "onecycle" (warm-up over warmup_fraction of
        # max_iter to base_lr, then cosine annealing).
        "schedule": "steps",
        "warmup_fraction": 0.15,
        # steps_with_relative_lrs: from iteration steps[i] on, lr = base_lr * lrs[i].
        "steps": [0, 150000, 300000],
        "lrs": [1.0, 0.1, 0.01],
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 1e-4,
        # BN gamma/beta; every other parameter (NL conv biases and the fc bias too) gets weight_decay.
        "weight_decay_bn": 0.0,
        # Re-estimate BN statistics over this many training batches before each checkpoint and evaluation.
        "precise_bn": True,
        "precise_bn_batches": 200,
        "checkpoint_period": 5000,
        # Keep the newest N periodic checkpoints (0 keeps all).
        "keep_checkpoints": 3,
        # Evaluate on data.val_list every N iterations (0: never during training).
        "eval_period": 0,
        "log_period": 20,
        # Autocast dtype: null (float32), bf16 or fp16 (fp16 adds a gradient scaler). Meant for CUDA; CPU
        # autocast works too but is rarely faster.
        "amp": None,
        "num_workers": 4,
        "tensorboard": True,
        # On CUDA: let cuDNN time its convolution algorithms for the (fixed) clip shape, and run float32
        # matmuls and convolutions on TF32 tensor cores. Ignored on CPU.
        "cudnn_benchmark": True,
        "tf32": True,
        # torch.compile the network for the training steps (the first steps pay for the compilation);
        # checkpoints hold the uncompiled module's state dict either way.
        "compile": False,
    },
    "test": {
        # Videos per batch; each video is test_clips x test_crops views.
        "batch_size": 1,
        "num_workers": 4,
        # Views that go through the network at once (the scores do not depend on it; memory does).
        "view_chunk": 6,
    },
}

# The detection recipe (``nlnet.engine.detection``): torchvision Mask/Keypoint R-CNN with non-local blocks,
# trained for a number of iterations with a linear warm-up into a step decay.
DETECTION_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    # Checkpoints, metrics.jsonl, config.yaml, detections_*.json and results.json go here.
    "output_dir": "runs/detection/shapes_maskrcnn_r50_nl",
    "model": {
        "name": "maskrcnn_r50_fpn",
        "nonlocal_backbone": True,
        # null: on for the keypoint model, off (not allowed) for Mask R-CNN.
        "nonlocal_head": None,
        "nonlocal_mode": "embedded_gaussian",
        # "bn": BN after W_z, γ = 0 at the start (the paper); null: no norm, W_z = 0 at the start.
        "nonlocal_norm": "bn",
        # false (with nonlocal_norm: null): W_z starts like the backbone's other convolutions, not at zero.
        "nonlocal_zero_init": True,
        # multiplies the softmax's d^-0.5 in the blocks (embedded Gaussian, Gaussian): >1 starts them sharper.
        "nonlocal_scale_mult": 1.0,
        # "bn" (batch statistics), "frozen_bn" (torchvision's choice with pre-trained weights), "gn" (GroupNorm
        # 32, for training from scratch with two images a step) or "ln" (each position's channels on their own:
        # from scratch, and nothing but the convolutions spreads information across the image).
        "backbone_norm": "bn",
        "trainable_backbone_layers": None,
        # The RoI size FPN pools from P4 (torchvision's 224, for 800-px images); scale it with smaller images.
        "roi_canonical_scale": 224,
        # A torchvision detector state dict (e.g. COCO-trained maskrcnn_resnet50_fpn) to start from.
        "weights": None,
        # A torchvision ImageNet ResNet state dict for the backbone.
        "weights_backbone": None,
        # Leave tensors whose shape differs from the file (a 91-class predictor) at their init.
        "skip_mismatched": False,
        # Keyword arguments of torchvision's MaskRCNN / KeypointRCNN. These defaults size the detector for the
        # built-in shapes on a CPU (small images, fewer proposals and RoI samples); the COCO recipes set
        # torchvision's values explicitly.
        "overrides": {
            "min_size": 128,
            "max_size": 160,
            "rpn_pre_nms_top_n_train": 600,
            "rpn_post_nms_top_n_train": 300,
            "rpn_pre_nms_top_n_test": 300,
            "rpn_post_nms_top_n_test": 100,
            "rpn_batch_size_per_image": 128,
            "box_batch_size_per_image": 64,
            "box_detections_per_img": 20,
        },
    },
    "data": {
        # "shapes" or "context" (the class is decided by a distant cue): a generated built-in set under
        # data.root, sized by the shapes_* keys; "coco": the four paths below.
        "format": "shapes",
        "root": "~/.cache/nlnet/detection-shapes",
        # "instances" (boxes + masks) or "keypoints"; must suit the model.
        "task": "instances",
        "train_images": None,
        "train_annotations": None,
        "val_images": None,
        "val_annotations": None,
        "shapes_train_images": 200,
        "shapes_val_images": 50,
        "shapes_image_size": [128, 160],
        # Context set only: "top" (the cue a bar across the top, 40 px above the objects) or "side" (a bar down
        # one edge, 340 px from the objects: out of a ResNet-50's reach); see nlnet.data.context_coco.
        "context_layout": "top",
        "flip_prob": 0.5,
        # OKS sigmas for keypoint AP; null means COCO's 17 person sigmas (only valid with 17 keypoints).
        "kpt_oks_sigmas": None,
    },
    "train": {
        # Global batch: images per step over all processes.
        "batch_size": 2,
        "max_iter": 250,
        # From scratch with trainable BN, 0.01 diverges within ten steps on the shapes set; 0.003 does not.
        "base_lr": 0.003,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        # The non-local blocks' learning rate is this times base_lr (the schedule applies to both).
        "nonlocal_lr_mult": 1.0,
        # lr rises linearly from base_lr * warmup_factor to base_lr over warmup_iters steps ...
        "warmup_iters": 50,
        "warmup_factor": 0.001,
        # ... and is multiplied by gamma at each of these iterations.
        "decay_steps": [180, 230],
        "gamma": 0.1,
        # Clip the gradient's global L2 norm to this before each step (null: no clipping).
        "clip_grad_norm": None,
        "checkpoint_period": 100,
        "keep_checkpoints": 2,
        "log_period": 10,
        "num_workers": 0,
        # Evaluate on the val set after training.
        "eval_at_end": True,
    },
    "test": {
        "batch_size": 2,
        "num_workers": 0,
    },
}


@dataclass(frozen=True)
class _Schema:
    """One task's recipe keys: their defaults, the checks their types cannot express, a name for messages."""

    defaults: dict[str, Any]
    validate: Callable[[DictConfig], None]
    label: str


# The one open mapping of both schemas: keyword arguments forwarded to the model's constructor.
_OPEN_NODES = ("model.overrides",)


def _schema(name: str) -> tuple[DictConfig, _Schema]:
    if name not in SCHEMAS:
        raise ValueError(f"schema must be one of {sorted(SCHEMAS)}, got {name!r}")
    schema = SCHEMAS[name]
    cfg = OmegaConf.create(schema.defaults)
    OmegaConf.set_struct(cfg, True)
    for key in _OPEN_NODES:
        OmegaConf.set_struct(OmegaConf.select(cfg, key), False)
    return cfg, schema


def recipes_dir() -> Path:
    """The folder of the recipes shipped with nlnet (package data, so it exists in a wheel install too)."""
    return Path(str(resources.files("nlnet") / "configs"))


def available_recipes() -> list[str]:
    """Names of the shipped recipes, as :func:`recipe_path` accepts them: ``detection/shapes_maskrcnn_r50``."""
    root = recipes_dir()
    return sorted(path.relative_to(root).with_suffix("").as_posix() for path in root.rglob("*.yaml"))


def recipe_path(recipe: str | Path) -> Path:
    """The YAML file of ``recipe``: a path to an existing file, or the name of a shipped recipe.

    A path that exists wins over a shipped recipe of the same name; a name may carry ``.yaml`` or not.

    Raises:
        FileNotFoundError: ``recipe`` is neither an existing file nor a shipped recipe's name; the message
            lists the names.
    """
    path = Path(recipe)
    if path.is_file():
        return path
    name = path.as_posix().removesuffix(".yaml")
    shipped = recipes_dir() / f"{name}.yaml"
    if not path.is_absolute() and shipped.is_file():
        return shipped
    raise FileNotFoundError(
        f"config {str(recipe)!r} is neither a file nor a shipped recipe; give a path to a YAML file or one of: "
        + ", ".join(available_recipes())
    )


def _read_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ValueError(f"config inheritance cycle: {chain}")
    if not path.is_file():
        named_by = f" (the _base_ of {seen[-1]})" if seen else ""
        raise FileNotFoundError(f"config file not found: {path}{named_by}")
    loaded = OmegaConf.load(path)
    if not isinstance(loaded, DictConfig):
        raise ValueError(f"{path}: expected a YAML mapping at the top level, got {type(loaded).__name__}")
    bases = loaded.pop("_base_", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not isinstance(bases, ListConfig):
        raise ValueError(f"{path}: _base_ must be a path or a list of paths, got {bases!r}")
    merged = OmegaConf.create()
    for base in bases:
        merged = OmegaConf.merge(merged, _read_with_bases(path.parent / str(base), (*seen, path)))
    return OmegaConf.merge(merged, loaded)


def read_recipe(recipe: str | Path | Mapping[str, Any]) -> DictConfig:
    """A recipe's own keys, ``_base_`` files merged in, without the schema (shared by every task's loader).

    Args:
        recipe: a path or shipped recipe name (:func:`recipe_path`), or a mapping already read, such as
            :func:`recipe_of_checkpoint` returns.

    Raises:
        FileNotFoundError: no such file or recipe name (:func:`recipe_path`), or a missing ``_base_`` file.
        ValueError: the file is not a YAML mapping, or its ``_base_`` chain has a cycle.
    """
    if isinstance(recipe, Mapping):
        return OmegaConf.create(dict(recipe))
    try:
        return _read_with_bases(recipe_path(recipe))
    except yaml.YAMLError as err:
        raise ValueError(f"{recipe}: not valid YAML: {err}") from err


def recipe_of_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    """The recipe a checkpoint was trained with, so that testing, evaluating and drawing need only the checkpoint.

    Training (video and detection) stores the resolved recipe in each checkpoint under ``"config"`` and writes
    it as ``config.yaml`` in the output folder; a file without one (a bare state dict copied beside its run's
    ``config.yaml``) falls back to that file.

    Raises:
        FileNotFoundError: the checkpoint does not exist, or it carries no recipe and has no ``config.yaml``
            beside it.
        ValueError: the checkpoint is not a readable weights-only file.
    """
    from nlnet.engine.checkpoint import load_checkpoint

    stored = load_checkpoint(checkpoint).get("config")
    if isinstance(stored, dict):
        return stored
    beside = Path(checkpoint).parent / "config.yaml"
    if beside.is_file():
        recipe = OmegaConf.to_container(read_recipe(beside), resolve=True)
        if isinstance(recipe, dict):
            return recipe
    raise FileNotFoundError(
        f"{checkpoint} carries no recipe and there is no config.yaml beside it: pass --config with the recipe "
        "it was trained with"
    )


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Sets each dotted ``key=value`` of ``overrides`` in ``cfg``, in place and in order.

    A value replaces what was there, mappings included: ``model.overrides.nonlocal_blocks={res4: [0]}`` on a
    recipe with ``{res3: [0]}`` gives ``{res4: [0]}``, not both. Values are parsed as YAML (``null``, numbers,
    ``[1, 2]``, ``{a: 1}``). A key the schema does not have raises (struct mode), as in a YAML recipe.

    Raises:
        ValueError: an item is not ``key=value``.
    """
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ValueError(f"override must look like key=value (e.g. train.max_iter=100), got {item!r}")
    for item in overrides:
        key = item.split("=", 1)[0]
        value = OmegaConf.select(OmegaConf.from_dotlist([item]), key)
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value)
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def load_config(
    path: str | Path | Mapping[str, Any] | None, overrides: Sequence[str] = (), *, schema: str = "video"
) -> DictConfig:
    """Loads a recipe: schema defaults, then the YAML file (and its ``_base_`` files), then overrides.

    Args:
        path: YAML recipe (a path or a shipped recipe's name, see :func:`recipe_path`), a mapping such as
            :func:`recipe_of_checkpoint` returns, or None for the defaults alone.
        overrides: dotted ``key=value`` strings, e.g. ``["train.max_iter=100", "data.root=/data/k400"]``;
            values are parsed as YAML (``null``, numbers, ``[1,2]``).
        schema: "video" (:data:`DEFAULTS`, checked by :func:`validate_config`) or "detection"
            (:data:`DETECTION_DEFAULTS`, checked by :func:`validate_detection_config`).

    Returns:
        The merged configuration, struct-mode (unknown keys raise), validated by the schema's checks.

    Raises:
        FileNotFoundError: no such recipe file or name.
        ValueError: an unknown schema, an override that is not ``key=value``, a key not in the schema, or an
            invalid value.
    """
    cfg, checks = _schema(schema)
    source = "recipe of the checkpoint" if isinstance(path, Mapping) else path
    try:
        if path is not None:
            cfg = OmegaConf.merge(cfg, read_recipe(path))
        apply_overrides(cfg, overrides)
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ValueError(f"invalid {checks.label}configuration ({source}): {err}") from err
    checks.validate(cfg)
    return cfg


def complete_config(cfg: DictConfig | Mapping[str, Any], *, schema: str = "video") -> DictConfig:
    """Fills in schema defaults for the keys ``cfg`` lacks and validates it (for configs built in Python).

    Raises:
        ValueError: an unknown schema, a key not in the schema or an invalid value.
    """
    defaults, checks = _schema(schema)
    try:
        merged = OmegaConf.merge(defaults, cfg)
    except OmegaConfBaseException as err:
        raise ValueError(f"invalid {checks.label}configuration: {err}") from err
    checks.validate(merged)
    return merged


def validate_config(cfg: DictConfig) -> None:
    """Checks values the schema's types cannot, so that a bad recipe fails before any data is read.

    Raises:
        ValueError: naming the key, what is allowed and what was given.
    """
    train = cfg.train
    if int(train.batch_size) < 1:
        raise ValueError(f"train.batch_size must be >= 1, got {train.batch_size}")
    if int(train.max_iter) < 1:
        raise ValueError(f"train.max_iter must be >= 1, got {train.max_iter}")
    steps, lrs = list(train.steps), list(train.lrs)
    if len(steps) != len(lrs) or not steps:
        raise ValueError(
            f"train.steps and train.lrs must have the same non-zero length, got {steps} and {lrs}"
        )
    if steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise ValueError(f"train.steps must start at 0 and increase strictly, got {steps}")
    if train.optimizer not in ("sgd", "adamw"):
        raise ValueError(f"train.optimizer must be 'sgd' or 'adamw', got {train.optimizer!r}")
    if train.schedule not in ("steps", "onecycle"):
        raise ValueError(f"train.schedule must be 'steps' or 'onecycle', got {train.schedule!r}")
    if not 0.0 < float(train.warmup_fraction) < 1.0:
        raise ValueError(f"train.warmup_fraction must be in (0, 1), got {train.warmup_fraction}")
    if train.amp not in (None, "bf16", "fp16"):
        raise ValueError(f"train.amp must be null, 'bf16' or 'fp16', got {train.amp!r}")
    if not isinstance(train.compile, bool):
        raise ValueError(f"train.compile must be true or false, got {train.compile!r}")
    for key in ("checkpoint_period", "eval_period", "log_period", "precise_bn_batches", "keep_checkpoints"):
        if int(train[key]) < 0:
            raise ValueError(f"train.{key} must be >= 0, got {train[key]}")
    if int(train.checkpoint_period) == 0:
        raise ValueError("train.checkpoint_period must be >= 1 (a checkpoint is also written at the end)")
    if int(train.log_period) == 0:
        raise ValueError("train.log_period must be >= 1")
    if cfg.model.freeze_bn and train.precise_bn:
        raise ValueError("model.freeze_bn=true keeps BN statistics fixed; set train.precise_bn=false with it")
    if int(cfg.test.batch_size) < 1:
        raise ValueError(f"test.batch_size must be >= 1, got {cfg.test.batch_size}")


def validate_detection_config(cfg: DictConfig) -> None:
    """The detection schema's checks: the model suits the task, the data paths and the schedule are complete.

    Raises:
        ValueError: naming the key, what is allowed and what was given (an unknown model: its name).
    """
    # Imported here: torchvision's detection models are needed only by detection recipes.
    from nlnet.models import detection as detection_models

    kind = detection_models.preset(cfg.model.name).kind
    task = cfg.data.task
    if (kind, task) not in (("mask", "instances"), ("keypoint", "keypoints")):
        raise ValueError(
            f"model {cfg.model.name!r} needs data.task={'instances' if kind == 'mask' else 'keypoints'}"
        )
    if cfg.data.format not in ("shapes", "context", "coco"):
        raise ValueError(f"data.format must be 'shapes', 'context' or 'coco', got {cfg.data.format!r}")
    if cfg.data.format == "coco":
        for key in ("train_images", "train_annotations", "val_images", "val_annotations"):
            if cfg.data[key] is None:
                raise ValueError(f"data.format='coco' needs data.{key}")
    train_cfg = cfg.train
    for key in ("batch_size", "max_iter", "checkpoint_period", "log_period"):
        if int(train_cfg[key]) < 1:
            raise ValueError(f"train.{key} must be >= 1, got {train_cfg[key]}")
    if int(train_cfg.warmup_iters) < 0 or not 0.0 < float(train_cfg.warmup_factor) <= 1.0:
        raise ValueError(
            f"train.warmup_iters must be >= 0 and warmup_factor in (0, 1], got {train_cfg.warmup_iters} and "
            f"{train_cfg.warmup_factor}"
        )
    if not float(train_cfg.nonlocal_lr_mult) > 0.0:
        raise ValueError(f"train.nonlocal_lr_mult must be > 0, got {train_cfg.nonlocal_lr_mult}")
    clip = train_cfg.clip_grad_norm
    if clip is not None and not float(clip) > 0.0:
        raise ValueError(f"train.clip_grad_norm must be > 0 or null, got {clip}")
    steps = list(train_cfg.decay_steps)
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)) or any(s < 1 for s in steps):
        raise ValueError(f"train.decay_steps must be positive and increasing, got {steps}")
    if int(cfg.test.batch_size) < 1:
        raise ValueError(f"test.batch_size must be >= 1, got {cfg.test.batch_size}")


SCHEMAS: dict[str, _Schema] = {
    "video": _Schema(DEFAULTS, validate_config, ""),
    "detection": _Schema(DETECTION_DEFAULTS, validate_detection_config, "detection "),
}
