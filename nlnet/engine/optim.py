"""The paper's optimiser and learning-rate schedule, plus the AdamW / one-cycle option of the built-in recipe.

SGD with Nesterov momentum 0.9 and coupled L2 weight decay 1e-4 on every trainable parameter except BN's
gamma and beta (the official ``WEIGHT_DECAY_BN 0.0``); the non-local convs' biases and the classifier bias do
get decay. The schedule is the official ``steps_with_relative_lrs``: a piecewise-constant multiple of the base
rate, switching at given iterations, stepped once per iteration.

The tiny networks trained on the built-in data set (``nlnet.data.builtin``) learn in a few hundred
iterations with AdamW (decoupled weight decay, same BN exemption) under a one-cycle schedule (warm-up to the
base rate, cosine annealing to ~0); ``train.optimizer: adamw`` and ``train.schedule: onecycle`` pick
them. The defaults stay the paper's.

The detectors (``nlnet.engine.detection``) use Detectron's schedule: a linear warm-up into the same kind of
steps (``kind="warmup_steps"``).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "RelativeStepSchedule",
    "WarmupStepSchedule",
    "build_optimizer",
    "build_scheduler",
    "split_weight_decay",
]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("steps", "onecycle", "warmup_steps")


def split_weight_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters split into (BN gamma/beta, everything else).

    BN parameters are found by module type, not by name, so a renamed layer cannot slip into the wrong group.
    """
    bn_ids = {
        id(p) for m in model.modules() if isinstance(m, _BatchNorm) for p in m.parameters(recurse=False)
    }
    bn, rest = [], []
    for p in model.parameters():
        if p.requires_grad:
            (bn if id(p) in bn_ids else rest).append(p)
    return bn, rest


def build_optimizer(
    model: nn.Module,
    *,
    base_lr: float,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 1e-4,
    weight_decay_bn: float = 0.0,
    name: str = "sgd",
    scaled: Iterable[nn.Parameter] = (),
    lr_mult: float = 1.0,
) -> torch.optim.Optimizer:
    """SGD (or AdamW) over the trainable parameters with separate weight decay for BN parameters.

    Args:
        model: the network (unwrapped).
        base_lr: learning rate before the schedule's multiplier.
        momentum: SGD momentum (unused by AdamW).
        nesterov: Nesterov momentum (official: True; unused by AdamW).
        weight_decay: L2 coefficient for all non-BN parameters, biases included (decoupled for AdamW).
        weight_decay_bn: L2 coefficient for BN gamma and beta (official: 0).
        name: "sgd" (the paper) or "adamw" (the built-in recipe; PyTorch's default betas and eps).
        scaled: parameters whose learning rate is ``lr_mult`` times the rest's (e.g. the non-local blocks'),
            in groups of their own named "decay_scaled" and "bn_scaled"; the schedule multiplies every group.
        lr_mult: their multiplier, > 0.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if not lr_mult > 0.0:
        raise ValueError(f"lr_mult must be > 0, got {lr_mult}")
    bn, rest = split_weight_decay(model)
    if not bn and not rest:
        raise ValueError("the model has no trainable parameters")
    scaled_ids = {id(p) for p in scaled}
    groups = []
    for params, decay, group in ((rest, weight_decay, "decay"), (bn, weight_decay_bn, "bn")):
        plain = [p for p in params if id(p) not in scaled_ids]
        boosted = [p for p in params if id(p) in scaled_ids]
        groups.append({"params": plain, "weight_decay": decay, "name": group})
        groups.append({"params": boosted, "weight_decay": decay, "name": f"{group}_scaled", "lr": base_lr * lr_mult})
    groups = [g for g in groups if g["params"]]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=base_lr)
    return torch.optim.SGD(groups, lr=base_lr, momentum=momentum, nesterov=nesterov, dampening=0.0)


class RelativeStepSchedule:
    """Learning-rate multiplier ``lrs[i]`` from iteration ``steps[i]`` until ``steps[i + 1]``.

    Args:
        steps: iterations where each phase begins; starts at 0, strictly increasing.
        lrs: multiplier of the base rate in each phase, e.g. [1, 0.1, 0.01].
    """

    def __init__(self, steps: Sequence[int], lrs: Sequence[float]) -> None:
        steps, lrs = [int(s) for s in steps], [float(v) for v in lrs]
        if len(steps) != len(lrs) or not steps:
            raise ValueError(f"steps and lrs must have the same non-zero length, got {steps} and {lrs}")
        if steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError(f"steps must start at 0 and increase strictly, got {steps}")
        self.steps = steps
        self.lrs = lrs

    def __call__(self, iteration: int) -> float:
        return self.lrs[bisect.bisect_right(self.steps, iteration) - 1]


class WarmupStepSchedule(RelativeStepSchedule):
    """:class:`RelativeStepSchedule` times a linear warm-up from ``warmup_factor`` to 1 over ``warmup_iters``.

    Plain numbers only, so that ``LambdaLR.state_dict()`` (which stores this object's ``__dict__``) stays
    loadable with ``weights_only=True``.

    Args:
        steps, lrs: the step table, as for :class:`RelativeStepSchedule`.
        warmup_iters: length of the warm-up in iterations (0: none).
        warmup_factor: multiplier at iteration 0, in (0, 1].
    """

    def __init__(
        self, steps: Sequence[int], lrs: Sequence[float], *, warmup_iters: int, warmup_factor: float
    ) -> None:
        super().__init__(steps, lrs)
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)

    def __call__(self, iteration: int) -> float:
        factor = super().__call__(iteration)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            factor *= self.warmup_factor * (1.0 - alpha) + alpha
        return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    steps: Sequence[int],
    lrs: Sequence[float],
    *,
    kind: str = "steps",
    max_iter: int | None = None,
    warmup_fraction: float = 0.15,
    warmup_iters: int = 0,
    warmup_factor: float = 1.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-iteration scheduler for every parameter group.

    Args:
        optimizer: from :func:`build_optimizer`; its groups' current ``lr`` is the base rate.
        steps, lrs: the :class:`RelativeStepSchedule` of ``kind="steps"`` and ``kind="warmup_steps"``.
        kind: "steps" (the paper), "warmup_steps" (the detectors: :class:`WarmupStepSchedule`) or "onecycle"
            (``OneCycleLR``: cosine warm-up over ``warmup_fraction`` of ``max_iter`` iterations from base/25 to
            the base rate, then cosine annealing to base/25e4).
        max_iter: total iterations; required for "onecycle".
        warmup_fraction: share of the iterations spent warming up, in (0, 1) ("onecycle").
        warmup_iters, warmup_factor: the linear warm-up of "warmup_steps".
    """
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    if kind == "steps":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, RelativeStepSchedule(steps, lrs))
    if kind == "warmup_steps":
        schedule = WarmupStepSchedule(steps, lrs, warmup_iters=warmup_iters, warmup_factor=warmup_factor)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if max_iter is None or max_iter < 1:
        raise ValueError(f"the onecycle schedule needs max_iter >= 1, got {max_iter}")
    if not 0.0 < warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must be in (0, 1), got {warmup_fraction}")
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[group["lr"] for group in optimizer.param_groups],
        total_steps=int(max_iter),
        pct_start=float(warmup_fraction),
    )
