"""Precise BN: replace BN running statistics by the exact mean and variance over many training batches.

During training, BN's running statistics are an exponential moving average of per-batch statistics taken while
the weights were still changing. Before evaluation and before each checkpoint, the official code re-estimates
them with the final weights over 200 training iterations on all GPUs (``bn_helper.py``). Here every
train-mode BN layer's input is accumulated in float64 as per-channel sum, sum of squares and count, summed
over processes, and the running mean and (unbiased, as PyTorch stores it) variance are set to those of all the
inputs together. Frozen (eval-mode) BN layers are left untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nlnet.engine.distributed import all_reduce_sum, any_rank

__all__ = ["agreed_clips", "update_bn_stats"]


def agreed_clips(
    batches: Iterable[dict[str, Any]],
    device: torch.device,
    model_input: Callable[[dict[str, Any], torch.device], torch.Tensor],
) -> Iterator[torch.Tensor]:
    """The clips of ``batches`` made ready on ``device`` by ``model_input`` (a dataset's ``model_input``:
    normalisation, or the device-side augmentation), leaving out a batch on every process when it is empty
    (all its videos unreadable) on any process.

    Every process must then run the same number of forward passes: with SyncBatchNorm each forward is a
    collective, and one process running fewer would leave the others waiting. ``batches`` must yield the
    same number of batches on every process (samplers that pad give each process an equal share).
    """
    for batch in batches:
        if any_rank(batch["clip"] is None):
            continue
        yield model_input(batch, device)


class _Moments:
    """Per-channel float64 sum, sum of squares and element count of a BN layer's inputs."""

    def __init__(self, channels: int, device: torch.device) -> None:
        self.total = torch.zeros(channels, dtype=torch.float64, device=device)
        self.total_sq = torch.zeros(channels, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().to(torch.float64)
        dims = [d for d in range(x.dim()) if d != 1]
        self.total += x.sum(dim=dims)
        self.total_sq += (x * x).sum(dim=dims)
        self.count += x.numel() / x.shape[1]


@torch.no_grad()
def update_bn_stats(model: nn.Module, clips: Iterable[torch.Tensor], num_batches: int) -> int:
    """Sets the running statistics of every train-mode BN layer to the exact statistics over ``clips``.

    The model is run in training mode (so each BN layer normalises with batch statistics, as during training,
    and the inputs of deeper layers are what training produces). The torch RNG is restored afterwards so that
    dropout masks drawn here do not shift the training run.

    Args:
        model: the network (unwrapped from DistributedDataParallel); must be in training mode.
        clips: input batches (B, 3, T, H, W) already on the model's device; one per training batch.
        num_batches: use at most this many batches. In multi-process runs every process must pass the same
            number of batches (the statistics are summed over processes).

    Returns:
        The number of batches used on this process (0 when the model has no train-mode BN layer).
    """
    if not model.training:
        raise ValueError("update_bn_stats expects the model in training mode (BN normalising by batch stats)")
    layers = [
        m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
    ]
    if not layers or num_batches <= 0:
        return 0
    device = layers[0].running_mean.device
    moments = [_Moments(layer.num_features, device) for layer in layers]
    hooks = [layer.register_forward_pre_hook(m) for layer, m in zip(layers, moments, strict=True)]
    used = 0
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            for clip in clips:
                if used >= num_batches:
                    break
                model(clip)
                used += 1
    finally:
        for hook in hooks:
            hook.remove()
    for layer, m in zip(layers, moments, strict=True):
        total, total_sq, count = all_reduce_sum(m.total), all_reduce_sum(m.total_sq), all_reduce_sum(m.count)
        if count < 2:
            continue
        mean = total / count
        var = (total_sq - count * mean * mean) / (count - 1)
        layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
        layer.running_var.copy_(var.clamp_min(0).to(layer.running_var.dtype))
    return used
