"""Training of the §6 detectors (torchvision Mask/Keypoint R-CNN with non-local blocks), and what the blocks cost.

:func:`train` runs an iteration-based recipe: SGD (momentum 0.9, no weight decay on BN), a linear warm-up into
a step decay (``nlnet.engine.optim``), atomic checkpoints that resume exactly where the run stopped
(``nlnet.engine.checkpoint``), DistributedDataParallel under ``torchrun``, and a COCO evaluation at the end
(``nlnet.engine.coco_eval``). :func:`evaluate_checkpoint` scores a saved detector on the recipe's val set;
:func:`measure_cost` counts the FLOPs and step time the non-local blocks add.

Recipes follow the detection schema of ``nlnet.engine.config`` (:func:`load_config`; unknown keys are errors,
dotted ``key=value`` overrides). The default recipe trains on the generated built-in shapes
(``nlnet.data.coco.make_shapes_coco``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nlnet.data.coco import CocoDetection, collate_detection, make_shapes_coco
from nlnet.data.context_coco import make_context_coco
from nlnet.engine import checkpoint as ckpt
from nlnet.engine import config
from nlnet.engine.build import build_model, read_detector_state_dict
from nlnet.engine.coco_eval import evaluate
from nlnet.engine.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    setup_distributed,
)
from nlnet.engine.optim import build_optimizer, build_scheduler
from nlnet.engine.sampler import ResumableSampler
from nlnet.models import detection as detection_models

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMAT",
    "build_datasets",
    "evaluate_checkpoint",
    "load_config",
    "measure_cost",
    "train",
]

CHECKPOINT_FORMAT = ckpt.DETECTION_CHECKPOINT_FORMAT


def load_config(path: str | Path | Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> DictConfig:
    """A detection recipe: ``nlnet.engine.config.load_config(path, overrides, schema="detection")``."""
    return config.load_config(path, overrides, schema="detection")


def build_datasets(data_cfg: DictConfig) -> tuple[CocoDetection, CocoDetection]:
    """(train, val) sets of a recipe; the built-in sets (shapes, context) are generated on first use."""
    task = data_cfg.task
    if data_cfg.format in ("shapes", "context"):
        make = make_shapes_coco
        if data_cfg.format == "context":
            make = functools.partial(make_context_coco, layout=data_cfg.context_layout)
        size = tuple(int(s) for s in data_cfg.shapes_image_size)
        root = Path(data_cfg.root).expanduser()
        train_dir, train_ann = make(
            root, "train", num_images=int(data_cfg.shapes_train_images), task=task, seed=1, image_size=size
        )
        val_dir, val_ann = make(
            root, "val", num_images=int(data_cfg.shapes_val_images), task=task, seed=2, image_size=size
        )
    else:
        train_dir, train_ann = data_cfg.train_images, data_cfg.train_annotations
        val_dir, val_ann = data_cfg.val_images, data_cfg.val_annotations
    train_set = CocoDetection(
        train_dir, train_ann, task=task, train=True, flip_prob=float(data_cfg.flip_prob), drop_empty=True
    )
    val_set = CocoDetection(val_dir, val_ann, task=task, train=False)
    if train_set.category_ids != val_set.category_ids:
        raise ValueError(
            f"train and val categories differ: {train_set.category_ids} vs {val_set.category_ids}"
        )
    return train_set, val_set


def _evaluate_recipe(
    model: nn.Module, val_set: CocoDetection, cfg: DictConfig, ctx: DistContext, out: Path
) -> dict[str, Any]:
    """`evaluate` with the recipe's test batch size, loader workers and keypoint OKS sigmas."""
    sigmas = cfg.data.kpt_oks_sigmas
    return evaluate(
        model,
        val_set,
        ctx=ctx,
        batch_size=int(cfg.test.batch_size),
        num_workers=int(cfg.test.num_workers),
        output_dir=out,
        kpt_oks_sigmas=None if sigmas is None else [float(s) for s in sigmas],
    )


def evaluate_checkpoint(
    cfg: DictConfig,
    checkpoint: str | Path,
    *,
    output_dir: str | Path | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on the recipe's val set: ``nlnet detect eval``.

    Args:
        cfg: the recipe (:func:`load_config`).
        checkpoint: an nlnet detection checkpoint or a bare torchvision detector state dict; non-local blocks
            it lacks (a baseline's checkpoint, a torchvision COCO detector) stay the identity.
        output_dir: where detections and results.json go (default ``cfg.output_dir``).
        device: "cpu" or "cuda"; None picks CUDA when available.

    Returns:
        What :func:`evaluate` returns.
    """
    ctx = setup_distributed(device)
    try:
        _, val_set = build_datasets(cfg.data)
        model_cfg = cfg.model.copy()
        model_cfg.weights = model_cfg.weights_backbone = None
        model = build_model(model_cfg, val_set)
        # strict but for non-local blocks, so a model trained without them can be scored with them (identity)
        report = detection_models.load_detector_state_dict(model, read_detector_state_dict(checkpoint))
        if report.missing_nonlocal:
            logger.info("%s has no non-local blocks; they stay the identity", checkpoint)
        model.to(ctx.device)
        out = Path(output_dir if output_dir is not None else cfg.output_dir)
        result = _evaluate_recipe(model, val_set, cfg, ctx, out)
        if ctx.is_main:
            record = {"checkpoint": str(checkpoint), **result}
            (out / "results.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
        return result
    finally:
        cleanup_distributed()


# --------------------------------------------------------------------------------------------------- training


def train(cfg: DictConfig, *, resume: bool | str | Path = False, device: str | None = None) -> dict[str, Any]:
    """Train the recipe ``cfg`` (and evaluate at the end); under ``torchrun`` every process calls this.

    Args:
        cfg: from :func:`load_config`.
        resume: False to start afresh (``output_dir`` must hold no checkpoint), True to continue from the
            latest checkpoint in ``output_dir`` (afresh if none), or a checkpoint path.
        device: "cpu" or "cuda"; None picks CUDA when available.

    Returns:
        {"iteration", "checkpoint" (final file), "losses" (last logged mean of each loss), "step_time_s"
        (median seconds per step), "metrics" (final evaluation, empty if off), "unreadable" (ids skipped)}.
    """
    ctx = setup_distributed(device)
    try:
        resume_from = ckpt.resolve_resume(cfg.output_dir, resume)
        return _Run(cfg, ctx).run(resume_from)
    finally:
        cleanup_distributed()


def _to_device(targets: Sequence[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """Targets with their tensors on ``device`` (the image id and other plain values stay as they are)."""
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]


class _Run:
    """State of one detection training run; methods are the loop's steps (as ``nlnet.engine.train``'s)."""

    def __init__(self, cfg: DictConfig, ctx: DistContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.out = Path(cfg.output_dir)
        self.global_batch = int(cfg.train.batch_size)
        if self.global_batch % ctx.world_size:
            raise ValueError(
                f"train.batch_size ({self.global_batch}) must be divisible by the {ctx.world_size} processes"
            )
        self.batch_per_rank = self.global_batch // ctx.world_size
        train_set = self._datasets()

        train_cfg = cfg.train
        seed = int(cfg.seed)
        ckpt.seed_everything(seed)
        self.model = build_model(cfg.model, train_set).to(ctx.device)
        self.ddp: nn.Module = self.model
        if ctx.world_size > 1:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
        self.optimizer = build_optimizer(
            self.model,
            base_lr=float(train_cfg.base_lr),
            momentum=float(train_cfg.momentum),
            nesterov=False,
            weight_decay=float(train_cfg.weight_decay),
            scaled=[p for block in detection_models.nonlocal_blocks(self.model).values() for p in block.parameters()],
            lr_mult=float(train_cfg.nonlocal_lr_mult),
        )
        # the recipe's decay steps, each a factor gamma more, as the step table of the shared schedule
        decay_steps = [int(s) for s in train_cfg.decay_steps]
        gamma = float(train_cfg.gamma)
        self.scheduler = build_scheduler(
            self.optimizer,
            [0, *decay_steps],
            [gamma**i for i in range(len(decay_steps) + 1)],
            kind="warmup_steps",
            warmup_iters=int(train_cfg.warmup_iters),
            warmup_factor=float(train_cfg.warmup_factor),
        )
        self.sampler = ResumableSampler(
            len(train_set), shuffle=True, seed=seed, rank=ctx.rank, world_size=ctx.world_size
        )
        # Each DataLoader iterator draws its workers' base seed; from its own generator (saved in checkpoints)
        # that draw leaves the global RNG, which RoI sampling and flips use, as it is in the uninterrupted run.
        self.loader_generator = torch.Generator().manual_seed(seed + ctx.rank)
        self.loader = torch.utils.data.DataLoader(
            train_set,
            batch_size=self.batch_per_rank,
            sampler=self.sampler,
            num_workers=int(train_cfg.num_workers),
            collate_fn=collate_detection,
            drop_last=True,
            generator=self.loader_generator,
        )

        self.iteration = 0
        self.unreadable: set[int] = set()
        self.step_times: list[float] = []
        # Per log period: each loss's values since the last log; then their means over all processes.
        self.window: dict[str, list[float]] = {}
        self.last_losses: dict[str, float] = {}
        self.jsonl = None

    def _datasets(self) -> CocoDetection:
        """Reads (the main process first generating the built-in set) the sets; keeps val, returns train."""
        if self.ctx.is_main:
            train_set, self.val_set = build_datasets(self.cfg.data)
        # the built-in set is generated by one process; the others wait and then read it
        barrier()
        if not self.ctx.is_main:
            train_set, self.val_set = build_datasets(self.cfg.data)
        self.iters_per_epoch = len(train_set) // self.global_batch
        if self.iters_per_epoch < 1:
            raise ValueError(
                f"the training set has {len(train_set)} usable images, fewer than one batch of {self.global_batch}"
            )
        return train_set

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint; a collective (RNG states and unreadable ids are gathered): all ranks take part."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "iteration": self.iteration,
            "global_batch": self.global_batch,
            "rng": all_gather_objects(ckpt.get_rng_state()),
            "loader_rng": all_gather_objects(self.loader_generator.get_state()),
            "unreadable": sorted({i for part in all_gather_objects(sorted(self.unreadable)) for i in part}),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{source}: not an nlnet detection checkpoint (format {state.get('format')!r})")
        if int(state["global_batch"]) != self.global_batch:
            raise ValueError(
                f"{source}: saved with global batch {state['global_batch']}, the config has {self.global_batch}"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration = int(state["iteration"])
        self.unreadable.update(int(i) for i in state["unreadable"])
        rng, loader_rng = state["rng"], state["loader_rng"]
        ckpt.set_rng_state(rng[self.ctx.rank % len(rng)])
        self.loader_generator.set_state(loader_rng[self.ctx.rank % len(loader_rng)])
        logger.info("resumed from %s at iteration %d", source, self.iteration)

    def save(self) -> None:
        state = self.state_dict()
        if self.ctx.is_main:
            ckpt.save_checkpoint(ckpt.checkpoint_path(self.out, self.iteration), state)
            ckpt.prune_checkpoints(self.out, int(self.cfg.train.keep_checkpoints))
        barrier()

    # ---------------------------------------------------------------- logging
    def _open_log(self) -> None:
        if not self.ctx.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True), encoding="utf-8")
        self.jsonl = open(self.out / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in run)

    def log(self, record: dict[str, Any]) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def _log_losses(self, lr: float) -> None:
        """Each loss's mean since the last log over all processes, to metrics.jsonl; a collective."""
        self.last_losses = {
            k: all_reduce_mean(torch.tensor(sum(v) / len(v), device=self.ctx.device)).item()
            for k, v in sorted(self.window.items())
        }
        self.window = {}
        log_period = int(self.cfg.train.log_period)
        record = {
            "event": "train",
            "iter": self.iteration,
            "lr": lr,
            "step_s": float(np.median(self.step_times[-log_period:])),
            **self.last_losses,
        }
        if self.jsonl is not None:
            self.log(record)
            logger.info("iter %d lr %.2e loss %.4f", self.iteration, lr, self.last_losses.get("loss", math.nan))

    # ---------------------------------------------------------------- steps
    def _note_unreadable(self, skipped: Sequence[int]) -> None:
        for image_id in skipped:
            if image_id not in self.unreadable:
                warnings.warn(f"training skips unreadable image id {image_id}", stacklevel=2)
            self.unreadable.add(image_id)

    def step(self, images: list[torch.Tensor], targets: list[dict[str, Any]]) -> None:
        device = self.ctx.device
        images = [image.to(device) for image in images]
        targets = _to_device(targets, device)
        # a batch left empty by unreadable images (on any process) skips the update on every process,
        # so that DDP's gradient all-reduce stays matched; the schedule still advances
        empty = torch.tensor(float(not images), device=device)
        if all_reduce_sum(empty).item() == 0:
            losses = self.ddp(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                values = {k: float(v) for k, v in losses.items()}
                raise FloatingPointError(f"loss is not finite at iteration {self.iteration}: {values}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.train.clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), float(self.cfg.train.clip_grad_norm))
            self.optimizer.step()
            for key, value in losses.items():
                self.window.setdefault(key, []).append(float(value.detach()))
            self.window.setdefault("loss", []).append(float(loss.detach()))
        self.scheduler.step()

    def _loop(self) -> None:
        train_cfg = self.cfg.train
        max_iter, log_period = int(train_cfg.max_iter), int(train_cfg.log_period)
        checkpoint_period = int(train_cfg.checkpoint_period)
        self.model.train()
        while self.iteration < max_iter:
            epoch, first = divmod(self.iteration, self.iters_per_epoch)
            self.sampler.set_epoch(epoch, start=first * self.batch_per_rank)
            batches = iter(self.loader)
            for _ in range(first, self.iters_per_epoch):
                if self.iteration >= max_iter:
                    break
                images, targets, skipped = next(batches)
                self._note_unreadable(skipped)
                tick = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                self.step(images, targets)
                self.iteration += 1
                self.step_times.append(time.perf_counter() - tick)
                if self.iteration % log_period == 0 or self.iteration == max_iter:
                    self._log_losses(lr)
                if self.iteration % checkpoint_period == 0 or self.iteration == max_iter:
                    self.save()
            del batches

    def _evaluate(self, final: Path) -> dict[str, Any]:
        result = _evaluate_recipe(self.model, self.val_set, self.cfg, self.ctx, self.out)
        self.log({"event": "val", "iter": self.iteration, **result["metrics"]})
        if self.jsonl is not None:
            (self.out / "results.json").write_text(json.dumps({"checkpoint": str(final), **result}, indent=2))
        return result["metrics"]

    def run(self, resume_from: Path | None) -> dict[str, Any]:
        if resume_from is not None:
            self.load_state_dict(ckpt.load_checkpoint(resume_from), resume_from)
        self._open_log()
        try:
            self._loop()
            final = ckpt.checkpoint_path(self.out, self.iteration)
            if not final.is_file():
                self.save()
            metrics = self._evaluate(final) if self.cfg.train.eval_at_end else {}
        finally:
            if self.jsonl is not None:
                self.jsonl.close()
        if self.unreadable:
            warnings.warn(
                f"training skipped {len(self.unreadable)} unreadable images: {sorted(self.unreadable)}", stacklevel=2
            )
        return {
            "iteration": self.iteration,
            "checkpoint": str(final),
            "losses": self.last_losses,
            "step_time_s": float(np.median(self.step_times)) if self.step_times else math.nan,
            "metrics": metrics,
            "unreadable": sorted(self.unreadable),
        }


# ------------------------------------------------------------------------------------------------------- cost


def measure_cost(
    cfg: DictConfig,
    *,
    steps: int = 5,
    image_size: Sequence[int] | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """What the recipe's non-local blocks cost: FLOPs (``torch.utils.flop_counter``) and training-step time.

    Two detectors are built from the same seed, the recipe's and the same without non-local blocks. FLOPs are
    counted for an inference forward pass on the recipe's first training images and, with ``image_size``, on a
    random image of that size (e.g. 800 x 1216, the paper's COCO scale; the detector's ``min_size`` and
    ``max_size`` are raised to fit it). The blocks' own cost is the difference of the two backbones' FLOPs on
    the same input, which does not depend on how many detections the heads process. Step time alternates the
    two models step by step, so both see the same machine load; the first step of each is not counted.

    Args:
        cfg: the recipe (:func:`load_config`).
        steps: timed training steps per model (forward, backward, SGD step).
        image_size: optional (H, W) for a second FLOP count.
        device: "cpu" or "cuda"; None picks CUDA when available.

    Returns:
        {"inputs": {label: {"backbone_gflops": {...}, "detector_gflops": {...}, "nonlocal_gflops",
        "nonlocal_share"}}, "step_time_s": {"nonlocal": median, "baseline": median}, "step_time_ratio"}.
        ``nonlocal_share`` is the blocks' FLOPs over the whole baseline detector's.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_set, _ = build_datasets(cfg.data)
    models = _nonlocal_and_baseline(cfg, train_set, dev)
    batch = [train_set[i] for i in range(min(int(cfg.train.batch_size), len(train_set)))]
    images = [image.to(dev) for image, _ in batch]
    targets = _to_device([target for _, target in batch], dev)

    inputs = {"recipe": images}
    if image_size is not None:
        height, width = (int(s) for s in image_size)
        inputs[f"{height}x{width}"] = [torch.rand(3, height, width, device=dev)]
    report: dict[str, Any] = {
        "inputs": {label: _count_flops(models, tensors, label != "recipe") for label, tensors in inputs.items()}
    }
    medians = _time_training_steps(models, images, targets, steps, dev)
    report["step_time_s"] = medians
    report["step_time_ratio"] = medians["nonlocal"] / medians["baseline"]
    report["images_per_step"] = len(images)
    return report


def _nonlocal_and_baseline(cfg: DictConfig, train_set: CocoDetection, dev: torch.device) -> dict[str, nn.Module]:
    """The recipe's detector and the same without non-local blocks, both initialised from the recipe's seed."""
    baseline_cfg = cfg.model.copy()
    baseline_cfg.nonlocal_backbone = False
    baseline_cfg.nonlocal_head = False
    models = {}
    for name, model_cfg in (("nonlocal", cfg.model), ("baseline", baseline_cfg)):
        ckpt.seed_everything(int(cfg.seed))
        models[name] = build_model(model_cfg, train_set).to(dev)
    if not detection_models.nonlocal_blocks(models["nonlocal"]):
        raise ValueError(
            "the recipe's model has no non-local block to measure (model.nonlocal_backbone=false?)"
        )
    return models


def _gflops(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 1e9


def _count_flops(models: dict[str, nn.Module], tensors: list[torch.Tensor], at_image_size: bool) -> dict[str, Any]:
    """Backbone and detector GFLOPs of each model on ``tensors``, and what the non-local blocks add."""
    entry: dict[str, Any] = {"backbone_gflops": {}, "detector_gflops": {}}
    for name, model in models.items():
        model.eval()
        transform = model.transform
        saved = (transform.min_size, transform.max_size)
        if at_image_size:
            # evaluate at the given size: the transform would otherwise rescale to the recipe's min_size
            transform.min_size, transform.max_size = (min(tensors[0].shape[-2:]),), max(tensors[0].shape[-2:])
        image_list, _ = transform(tensors)
        entry["backbone_gflops"][name] = _gflops(lambda m=model, x=image_list.tensors: m.backbone(x))
        entry["detector_gflops"][name] = _gflops(lambda m=model, x=tensors: m(x))
        transform.min_size, transform.max_size = saved
    added = entry["backbone_gflops"]["nonlocal"] - entry["backbone_gflops"]["baseline"]
    if any(".keypoint_head." in n for n in detection_models.nonlocal_blocks(models["nonlocal"])):
        # head blocks run on every RoI, so their cost is only seen through the whole detector
        added = entry["detector_gflops"]["nonlocal"] - entry["detector_gflops"]["baseline"]
    entry["nonlocal_gflops"] = added
    entry["nonlocal_share"] = added / entry["detector_gflops"]["baseline"]
    return entry


def _time_training_steps(
    models: dict[str, nn.Module],
    images: list[torch.Tensor],
    targets: list[dict[str, Any]],
    steps: int,
    dev: torch.device,
) -> dict[str, float]:
    """Median seconds of a training step of each model, the models taking turns; the first step is not counted."""
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-5, momentum=0.9) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(steps + 1):
        for name, model in models.items():
            model.train()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            tick = time.perf_counter()
            losses = model(images, targets)
            optimizers[name].zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizers[name].step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if step > 0:
                times[name].append(time.perf_counter() - tick)
    return {name: float(np.median(t)) for name, t in times.items()}
