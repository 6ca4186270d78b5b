"""The training loop of the paper's recipe: iteration-based SGD, per-device BN, precise BN, exact resume, DDP.

One call, :func:`train`, runs a whole recipe from a config (``nlnet.engine.config``). The loop counts
optimiser steps, not epochs: iteration ``i`` belongs to epoch ``i // iters_per_epoch`` and is batch
``i % iters_per_epoch`` of that epoch's order (``ResumableSampler``), so a checkpoint's iteration alone says
which clips come next. Augmentation randomness is derived by the dataset from (seed, epoch, index) and the
torch RNG (dropout) is saved per rank, so a run resumed from a checkpoint continues exactly as the
uninterrupted run would have on CPU. Under ``torchrun`` every process trains on its shard of each global
batch, gradients are averaged by DistributedDataParallel, BN statistics stay per process (as in the paper),
and only rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from nlnet.engine.build import build_model
from nlnet.engine.builtin import resolve_builtin
from nlnet.engine.checkpoint import (
    checkpoint_path,
    get_rng_state,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from nlnet.engine.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_sum,
    any_rank,
    barrier,
    cleanup_distributed,
    configure_backends,
    setup_distributed,
)
from nlnet.engine.optim import build_optimizer, build_scheduler
from nlnet.engine.precise_bn import agreed_clips, update_bn_stats
from nlnet.engine.sampler import ResumableSampler

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMAT",
    "freeze_batchnorm",
    "set_train_mode",
    "train",
]

CHECKPOINT_FORMAT = "nlnet-train-1"
# The precise-BN batches come from their own order, so estimating statistics never shifts the training data.
_PRECISE_BN_SEED_OFFSET = 7919


def freeze_batchnorm(model: nn.Module) -> int:
    """Turns every BN layer into a fixed affine transform: eval mode, parameters not trained.

    Call :func:`set_train_mode` instead of ``model.train()`` afterwards, since ``train()`` would put the BN
    layers back into batch-statistics mode.

    Returns:
        The number of BN layers frozen.
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for layer in layers:
        layer.eval()
        for p in layer.parameters(recurse=False):
            p.requires_grad_(False)
    return len(layers)


def set_train_mode(model: nn.Module, frozen_bn: bool) -> None:
    """``model.train()``, keeping BN layers in eval mode when they are frozen."""
    model.train()
    if frozen_bn:
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.eval()


def _loss(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> torch.Tensor:
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


class _Run:
    """State of one training run; methods are the loop's steps."""

    def __init__(self, cfg: DictConfig, ctx: DistContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.out = Path(cfg.output_dir)
        train_cfg = cfg.train
        if int(train_cfg.batch_size) % ctx.world_size:
            raise ValueError(
                f"train.batch_size ({train_cfg.batch_size}) must be divisible by the number of processes "
                f"({ctx.world_size})"
            )
        self.batch_per_rank = int(train_cfg.batch_size) // ctx.world_size
        self.multi_label = bool(cfg.data.multi_label)
        self.frozen_bn = bool(cfg.model.freeze_bn)

        self._build_data()
        self._build_model()
        self._build_optimizer()
        amp = train_cfg.amp
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[amp]
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp == "fp16")

        self.iteration = 0
        # Per log period, on the device: sum of the losses, non-finite losses, since iteration period_start.
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        self.nonfinite = torch.zeros((), dtype=torch.float64, device=ctx.device)
        self.loss_steps = 0
        self.period_start = 0
        self.skipped: dict[str, None] = {}
        self.precise_bn_at = -1
        self.writer = None
        self.jsonl = None

    def _build_data(self) -> None:
        """The training set, its resumable loader, and the precise-BN and validation loaders."""
        from nlnet.data import build_dataset, build_loader

        cfg, ctx, train_cfg = self.cfg, self.ctx, self.cfg.train
        # Workers send uint8 clips (a quarter of float32's bytes through shared memory and the copy to the
        # device), pinned for asynchronous copies on CUDA; they are normalised on the device (and with
        # data.augment_on: device, cut from the source frames there: VideoClipDataset.model_input).
        self.pin_memory = ctx.device.type == "cuda"
        # Reading the annotation lists first: a malformed line stops the run before any model is built.
        augment_on = str(cfg.data.augment_on)
        self.dataset = build_dataset(cfg.data, "train", normalized=False, augment_on=augment_on)
        decoded = None
        if cfg.data.cache_decoded:
            from nlnet.data.cache import cache_decoded

            workers = cfg.data.cache_workers
            workers = int(train_cfg.num_workers if workers is None else workers)
            decoded = cache_decoded(self.dataset, num_workers=workers, progress=ctx.is_main)
        self.iters_per_epoch = len(self.dataset) // int(train_cfg.batch_size)
        if self.iters_per_epoch < 1:
            raise ValueError(
                f"the training set has {len(self.dataset)} videos, fewer than one global batch "
                f"(train.batch_size={train_cfg.batch_size})"
            )
        self.sampler = ResumableSampler(
            len(self.dataset), shuffle=True, seed=int(cfg.seed), rank=ctx.rank, world_size=ctx.world_size
        )
        self.loader = build_loader(
            self.dataset,
            self.batch_per_rank,
            shuffle=False,
            num_workers=int(train_cfg.num_workers),
            sampler=self.sampler,
            seed=int(cfg.seed),
            drop_last=True,
            pin_memory=self.pin_memory,
        )
        self.bn_dataset = None
        if train_cfg.precise_bn and int(train_cfg.precise_bn_batches) > 0:
            self.bn_dataset = build_dataset(cfg.data, "train", normalized=False, augment_on=augment_on)
            if decoded is not None:
                self.bn_dataset.read_frames = decoded
            self.bn_sampler = ResumableSampler(
                len(self.bn_dataset),
                shuffle=True,
                seed=int(cfg.seed) + _PRECISE_BN_SEED_OFFSET,
                rank=ctx.rank,
                world_size=ctx.world_size,
            )
            self.bn_loader = build_loader(
                self.bn_dataset,
                self.batch_per_rank,
                shuffle=False,
                num_workers=int(train_cfg.num_workers),
                sampler=self.bn_sampler,
                seed=int(cfg.seed),
                drop_last=True,
                pin_memory=self.pin_memory,
                # Read at checkpoints only: persistent workers would sit idle on their memory in between.
                persistent_workers=False,
            )
        self.val_loader = None
        if int(train_cfg.eval_period) > 0:
            from nlnet.engine.evaluate import build_eval_loader

            self.val_loader = build_eval_loader(cfg, "val", ctx)

    def _build_model(self) -> None:
        """The network on the device (frozen or synchronised BN, DDP), seeded per rank."""
        cfg, ctx, train_cfg = self.cfg, self.ctx, self.cfg.train
        seed_everything(int(cfg.seed) + ctx.rank)
        model = build_model(cfg.model)
        if self.frozen_bn:
            count = freeze_batchnorm(model)
            logger.info("froze %d BN layers (affine, eval mode)", count)
        model.to(ctx.device)
        configure_backends(
            ctx.device, cudnn_benchmark=bool(train_cfg.cudnn_benchmark), tf32=bool(train_cfg.tf32)
        )
        if cfg.model.sync_bn:
            if ctx.device.type != "cuda":
                raise ValueError(
                    "model.sync_bn=true needs CUDA (SyncBatchNorm does not run on CPU); set "
                    "model.sync_bn=false to keep BN statistics per process as the paper does"
                )
            if self.frozen_bn:
                raise ValueError("model.sync_bn and model.freeze_bn exclude each other")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.ddp: nn.Module = model
        if ctx.world_size > 1:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=device_ids)
        if train_cfg.compile:
            # Compiling the DDP wrapper (not DDP over a compiled module) is PyTorch's recommended order: Dynamo's
            # DDPOptimizer then splits the graph at the gradient buckets so all-reduces overlap the backward.
            # Only the training step runs through it; checkpoints, precise BN and evaluation use self.model,
            # whose state-dict keys carry no "_orig_mod." prefix.
            self.ddp = torch.compile(self.ddp)

    def _build_optimizer(self) -> None:
        """The recipe's optimiser and learning-rate schedule."""
        train_cfg = self.cfg.train
        self.optimizer = build_optimizer(
            self.model,
            base_lr=float(train_cfg.base_lr),
            momentum=float(train_cfg.momentum),
            nesterov=bool(train_cfg.nesterov),
            weight_decay=float(train_cfg.weight_decay),
            weight_decay_bn=float(train_cfg.weight_decay_bn),
            name=str(train_cfg.optimizer),
        )
        self.scheduler = build_scheduler(
            self.optimizer,
            train_cfg.steps,
            train_cfg.lrs,
            kind=str(train_cfg.schedule),
            max_iter=int(train_cfg.max_iter),
            warmup_fraction=float(train_cfg.warmup_fraction),
        )

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        epoch, batch = divmod(self.iteration, self.iters_per_epoch)
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "epoch": epoch,
            "sampler": {
                "seed": int(self.cfg.seed),
                "epoch": epoch,
                "batch_in_epoch": batch,
                "batch_per_rank": self.batch_per_rank,
                "world_size": self.ctx.world_size,
            },
            "rng": all_gather_objects(get_rng_state()),
            "skipped": list(self._all_skipped()),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{source}: not an nlnet training checkpoint (format {state.get('format')!r})")
        sampler = state["sampler"]
        if sampler["batch_per_rank"] * sampler["world_size"] != int(self.cfg.train.batch_size):
            raise ValueError(
                f"{source}: saved with global batch {sampler['batch_per_rank'] * sampler['world_size']}, the "
                f"config has train.batch_size={self.cfg.train.batch_size}"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.skipped = dict.fromkeys(state["skipped"])
        rng = state["rng"]
        if len(rng) != self.ctx.world_size:
            warnings.warn(
                f"{source} was written by {len(rng)} processes, resuming with {self.ctx.world_size}: the "
                "data order is unchanged but dropout masks will differ from the original run",
                stacklevel=2,
            )
        set_rng_state(rng[self.ctx.rank % len(rng)])

    def _all_skipped(self) -> list[str]:
        merged: dict[str, None] = {}
        for names in all_gather_objects(list(self.skipped)):
            merged.update(dict.fromkeys(names))
        return sorted(merged)

    # ---------------------------------------------------------------- logging
    def _open_logs(self) -> None:
        if not self.ctx.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.out / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in close)
        if self.cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.iteration + 1)

    def log(self, record: dict[str, Any]) -> None:
        if not self.ctx.is_main:
            return
        assert self.jsonl is not None
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None and "iter" in record:
            for key, value in record.items():
                if key not in ("iter", "epoch", "event") and isinstance(value, int | float):
                    self.writer.add_scalar(f"{record.get('event', 'train')}/{key}", value, record["iter"])

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()

    # ---------------------------------------------------------------- steps
    def precise_bn(self) -> None:
        if self.bn_dataset is None or self.precise_bn_at == self.iteration:
            return
        self.bn_dataset.set_epoch(self.iteration)
        self.bn_sampler.set_epoch(self.iteration)
        clips = agreed_clips(self.bn_loader, self.ctx.device, self.bn_dataset.model_input)
        with self._autocast():
            used = update_bn_stats(self.model, clips, int(self.cfg.train.precise_bn_batches))
        self.precise_bn_at = self.iteration
        logger.info("precise BN at iteration %d over %d batches per process", self.iteration, used)

    def _check_finite(self) -> None:
        """Raises on every process if a loss since the last log was not finite; before weights are used."""
        nonfinite = float(all_reduce_sum(self.nonfinite))
        if nonfinite > 0:
            raise FloatingPointError(
                f"{int(nonfinite)} non-finite losses (over all processes) in iterations "
                f"{self.period_start + 1}-{self.iteration}"
            )

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.ctx.device.type, dtype=self.amp_dtype)

    def save(self) -> None:
        self._check_finite()
        self.precise_bn()
        state = self.state_dict()  # collective (gathers RNG states and skipped names): all ranks take part
        if self.ctx.is_main:
            path = checkpoint_path(self.out, self.iteration)
            save_checkpoint(path, state)
            prune_checkpoints(self.out, int(self.cfg.train.keep_checkpoints))
            self.log({"event": "checkpoint", "iter": self.iteration, "path": str(path)})
        barrier()

    def evaluate(self) -> dict[str, float]:
        from nlnet.engine.evaluate import predict, summarize

        self._check_finite()
        self.precise_bn()
        result = predict(
            self.model,
            self.val_loader,
            self.ctx,
            multi_label=self.multi_label,
            amp_dtype=self.amp_dtype,
            view_chunk=int(self.cfg.test.view_chunk),
        )
        set_train_mode(self.model, self.frozen_bn)
        metrics = summarize(result, multi_label=self.multi_label)
        self.log({"event": "val", "iter": self.iteration, **metrics})
        for name in result.skipped:
            self.skipped.setdefault(name)
        return metrics

    def _flush_losses(self, clip_count: int) -> tuple[float, int]:
        """Mean loss since the last flush over all processes and their clip count; one read of the device.

        Raises:
            FloatingPointError: on every process, when some process had a non-finite loss since the last
                flush (the weights are then no longer usable).
        """
        local = torch.stack(
            [
                self.loss_sum,
                torch.tensor(float(self.loss_steps), dtype=torch.float64, device=self.ctx.device),
                self.nonfinite,
                torch.tensor(float(clip_count), dtype=torch.float64, device=self.ctx.device),
            ]
        )
        loss_sum, steps, nonfinite, clips = all_reduce_sum(local).tolist()
        if nonfinite > 0:
            raise FloatingPointError(
                f"{int(nonfinite)} non-finite losses (over all processes) in iterations "
                f"{self.period_start + 1}-{self.iteration}"
            )
        self.loss_sum.zero_()
        self.nonfinite.zero_()
        self.loss_steps = 0
        self.period_start = self.iteration
        return (loss_sum / steps if steps else math.nan), int(clips)

    def step(self, batch: dict[str, Any]) -> None:
        clip, labels = batch["clip"], batch["label"]
        for name in batch["skipped"]:
            if name not in self.skipped:
                warnings.warn(f"training skips unreadable video {name}", stacklevel=2)
            self.skipped.setdefault(name)
        # Every process must skip together (DDP's backward is a collective). Each process knows on the host
        # whether its batch is empty, so the agreement is a one-integer gloo all-reduce on the CPU: it does not
        # wait for the GPU, which keeps running ahead.
        if any_rank(clip is None):
            # Every clip of the batch (on some process) was unreadable: all processes skip the update together
            # and the schedule still advances, so the iteration count keeps its meaning. (PyTorch warns when a
            # scheduler steps before the optimiser has; here that is intended.)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                self.scheduler.step()
            return
        clip = self.dataset.model_input(batch, self.ctx.device)
        labels = labels.to(self.ctx.device, non_blocking=True)
        with self._autocast():
            logits = self.ddp(clip)
        loss = _loss(logits, labels, self.multi_label)
        # No host read here (it would wait for the GPU every step): the loss and a non-finite count stay on
        # the device until _flush_losses checks and logs them, on every process together.
        self.loss_sum += loss.detach()
        self.loss_steps += 1
        self.nonfinite += (~torch.isfinite(loss.detach())).to(torch.float64)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def run(self, resume_from: Path | None) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        max_iter = int(cfg.train.max_iter)
        if resume_from is not None:
            # Read on the CPU: load_state_dict moves the model's and optimiser's tensors to their device, and
            # the RNG states must be CPU tensors (NumPy's cannot be rebuilt from a CUDA tensor).
            self.load_state_dict(load_checkpoint(resume_from), resume_from)
            self.period_start = self.iteration
        self._open_logs()
        if resume_from is not None:
            self.log({"event": "resume", "iter": self.iteration, "path": str(resume_from)})
            logger.info("resumed from %s at iteration %d", resume_from, self.iteration)
        set_train_mode(self.model, self.frozen_bn)
        bar = tqdm(
            total=max_iter,
            initial=self.iteration,
            disable=not ctx.is_main,
            dynamic_ncols=True,
            desc="train",
            mininterval=1.0,
        )
        log_period = int(cfg.train.log_period)
        clip_count, tick = 0, time.perf_counter()
        metrics: dict[str, float] = {}
        while self.iteration < max_iter:
            epoch, first = divmod(self.iteration, self.iters_per_epoch)
            self.dataset.set_epoch(epoch)
            self.sampler.set_epoch(epoch, start=first * self.batch_per_rank)
            batches = iter(self.loader)
            for _ in range(first, self.iters_per_epoch):
                if self.iteration >= max_iter:
                    break
                batch = next(batches)
                lr = self.optimizer.param_groups[0]["lr"]
                self.step(batch)
                self.iteration += 1
                clip_count += len(batch["index"])
                bar.update(1)
                if self.iteration % log_period == 0 or self.iteration == max_iter:
                    mean_loss, clips = self._flush_losses(clip_count)
                    elapsed = max(time.perf_counter() - tick, 1e-9)
                    record = {
                        "event": "train",
                        "iter": self.iteration,
                        "epoch": epoch,
                        "loss": mean_loss,
                        "lr": lr,
                        "clips_per_s": clips / elapsed,
                        "eta_s": (max_iter - self.iteration) * elapsed / log_period,
                    }
                    self.log(record)
                    bar.set_postfix(
                        loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", clips_s=f"{record['clips_per_s']:.1f}"
                    )
                    clip_count, tick = 0, time.perf_counter()
                period = int(cfg.train.checkpoint_period)
                if self.iteration % period == 0 or self.iteration == max_iter:
                    self.save()
                eval_period = int(cfg.train.eval_period)
                if self.val_loader is not None and (
                    self.iteration % eval_period == 0 or self.iteration == max_iter
                ):
                    metrics = self.evaluate()
                    summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                    bar.write(f"iter {self.iteration}: {summary}")
            del batches
        bar.close()
        skipped = self._all_skipped()
        if skipped:
            message = f"{len(skipped)} unreadable videos were skipped: " + ", ".join(skipped)
            warnings.warn(message, stacklevel=2)
            self.log({"event": "skipped_videos", "iter": self.iteration, "videos": skipped})
        self.close()
        return {
            "iteration": self.iteration,
            "checkpoint": str(checkpoint_path(self.out, self.iteration)),
            "metrics": metrics,
            "skipped": skipped,
        }


def train(
    cfg: DictConfig | dict, *, resume: bool | str | Path = False, device: str | None = None
) -> dict[str, Any]:
    """Trains the recipe ``cfg``; under ``torchrun`` every process calls this.

    Args:
        cfg: from :func:`nlnet.engine.config.load_config`, or a partial config / dict (schema defaults fill
            in the rest).
        resume: False to start from scratch (``output_dir`` must hold no checkpoint), True to continue from
            the latest checkpoint in ``cfg.output_dir`` (from scratch if there is none), or a checkpoint path.
        device: "cpu" or "cuda" to force one; None picks CUDA when available.

    Returns:
        {"iteration", "checkpoint" (final file), "metrics" (last validation, may be empty),
        "skipped" (names of unreadable videos)}.
    """
    cfg = resolve_builtin(cfg)
    ctx = setup_distributed(device)
    try:
        out = Path(cfg.output_dir)
        resume_from = resolve_resume(out, resume)
        run = _Run(cfg, ctx)
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
        return run.run(resume_from)
    finally:
        cleanup_distributed()
