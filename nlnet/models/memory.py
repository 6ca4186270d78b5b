"""Training memory of a video model per GPU, planned from one forward pass on fake tensors.

A user adding two non-local blocks to a network saw their batch fall from 6 to 2 (facebookresearch
video-nonlocal-net#70): the paper's blocks build each N×M affinity literally and keep it for backward. This
module says, before anything is allocated, what a training step keeps: the parameters, their gradients and
the optimiser state, plus the activations autograd saves for backward, counted by
`nlnet.utils.memory.SavedTensorCounter` on a forward pass through fake tensors (shapes, no data), once with
nlnet's blocks and once with the same network's blocks built with ``impl="explicit"``.

What is counted, and what is not:

- Optimiser state is SGD with momentum, the paper's: one buffer per parameter. Adam would add a second.
- Parameters, gradients and momentum stay float32 under ``amp="bf16"``; the activations are those autocast
  produces, including the bfloat16 copies of the weights that the convolutions keep for backward.
- The pass runs on the CPU's fake tensors, so it takes the CPU kernel choices; the non-local block's CUDA
  paths keep the same tensors (queries, keys, values, the output and per-query statistics).
- Not counted: short-lived temporaries of the forward and backward (the largest is about one layer's
  activation gradient), convolution workspaces, the CUDA context (a few hundred MiB) and allocator
  fragmentation. Leave headroom.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

from nlnet.models.registry import create
from nlnet.utils.memory import SavedTensorCounter

IMPLS = ("nlnet", "explicit")  # the two forms compared: nlnet's lean blocks and the literal N×M blocks
AMP_DTYPES = {None: None, "bf16": torch.bfloat16}
CLIP_FRAMES = {"32x2": 32, "8x8": 8}  # frames of a clip by its name: frames x sampling stride
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_memory_size(text: str) -> int:
    """Bytes of a size such as "80GiB", "80 GB" (10⁹), "141GiB", "512MiB" or "1e9".

    Raises:
        ValueError: on anything else, naming the units allowed.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if match is None or match.group(2) not in _UNITS:
        raise ValueError(
            f"memory size must be a number with a unit ({', '.join(u for u in _UNITS if u)}), got {text!r}"
        )
    size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return size


@dataclass(frozen=True)
class ActivationPlan:
    """Activation bytes of one form of the network: measured at the asked batch, and the line through it.

    Attributes:
        at_batch: bytes saved for backward at the asked batch, measured.
        per_sample: bytes each further clip adds (measured at the asked batch and one more).
        fixed: the part that does not grow with the batch (bfloat16 weight copies under autocast, ...).
        largest_batch: the largest batch whose total fits the GPU memory (measured there), None if none asked.
    """

    at_batch: int
    per_sample: int
    fixed: int
    largest_batch: int | None


@dataclass(frozen=True)
class TrainingMemory:
    """What one training step keeps per GPU, for nlnet's blocks and the explicit N×M blocks.

    Attributes:
        name: the model's name.
        batch: clips per GPU.
        input_shape: (C, T, H, W) of one clip.
        amp: None (float32) or "bf16" (autocast to bfloat16).
        params: number of parameters.
        static_bytes: parameters and buffers, gradients and one SGD momentum buffer per parameter.
        activations: {"nlnet": plan, "explicit": plan}.
        gpu_memory: the memory the largest batches were fitted to, in bytes, or None.
    """

    name: str
    batch: int
    input_shape: tuple[int, ...]
    amp: str | None
    params: int
    static_bytes: int
    activations: dict[str, ActivationPlan]
    gpu_memory: int | None

    def total(self, impl: str) -> int:
        """Static plus activation bytes at the asked batch, for impl "nlnet" or "explicit"."""
        return self.static_bytes + self.activations[impl].at_batch

    def summary(self) -> str:
        """The table `nlnet info NAME --train-memory` prints."""
        clip = "x".join(str(size) for size in self.input_shape)
        precision = "float32" if self.amp is None else f"autocast {self.amp}"
        lines = [
            f"model       {self.name}, batch {self.batch} of {clip}, {precision}, train mode",
            f"{'GiB per GPU':<44}{'nlnet blocks':>14}{'explicit N×M':>14}",
            _row("parameters + gradients + SGD momentum", self.static_bytes, self.static_bytes),
            _row("activations kept for backward", *(self.activations[impl].at_batch for impl in IMPLS)),
            _row("  of which per clip", *(self.activations[impl].per_sample for impl in IMPLS)),
            _row("total", *(self.total(impl) for impl in IMPLS)),
        ]
        if self.gpu_memory is not None:
            fits = [self.activations[impl].largest_batch for impl in IMPLS]
            label = f"largest batch in {_gib(self.gpu_memory)} GiB"
            lines.append(f"{label:<44}{fits[0]:>14}{fits[1]:>14}")
        lines.append("not counted: temporaries, workspaces, CUDA context, fragmentation; leave headroom")
        return "\n".join(lines)


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f}"


def _row(label: str, *values: int) -> str:
    return f"{label:<44}" + "".join(f"{_gib(value):>14}" for value in values)


def training_memory(
    name: str,
    batch: int,
    *,
    clip: str = "32x2",
    size: int = 224,
    amp: str | None = None,
    gpu_memory: int | str | None = None,
    num_classes: int = 400,
    **overrides,
) -> TrainingMemory:
    """Plan the memory of one training step of a video model, nlnet's blocks beside the explicit ones.

    Nothing is allocated: the networks and clips are fake tensors, and each forward pass (train mode, with
    the cross-entropy loss) takes about a second for R50 on 32 x 224 x 224 clips. Activations are measured at
    ``batch`` and ``batch + 1`` (the slope is the per-clip part); the largest batch that fits is predicted
    from that line and then measured, stepping down while it does not fit.

    Args:
        name: a video model's name, e.g. "nl_i3d_r50".
        batch: clips per GPU, at least 1.
        clip: "32x2" (32 frames) or "8x8" (8 frames); also the model's ``clip`` override (its stem).
        size: height and width of the crop.
        amp: None for float32, "bf16" to run the pass under ``torch.autocast(dtype=torch.bfloat16)``.
        gpu_memory: bytes, or a size such as "80GiB", to find the largest batch for; None skips that.
        num_classes: classifier outputs.
        **overrides: as for `nlnet.models.create`, except clip and nonlocal_impl (both forms are planned).

    Returns:
        The plan; ``summary()`` is the table the CLI prints.

    Raises:
        ValueError: on a bad batch, clip, size, amp or memory size, or what `create` refuses.
    """
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if clip not in CLIP_FRAMES:
        raise ValueError(f"clip must be one of {sorted(CLIP_FRAMES)}, got {clip!r}")
    if not isinstance(size, int) or size < 32:
        raise ValueError(f"size must be an integer of at least 32 (the network strides by 32), got {size!r}")
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {list(AMP_DTYPES)}, got {amp!r}")
    taken = sorted({"clip", "nonlocal_impl"} & set(overrides))
    if taken:
        raise ValueError(f"{taken} are set by training_memory itself (clip=..., and both block forms)")
    memory = parse_memory_size(gpu_memory) if isinstance(gpu_memory, str) else gpu_memory
    if memory is not None and (not isinstance(memory, int) or memory <= 0):
        raise ValueError(f"gpu_memory must be a positive number of bytes or a size like '80GiB', got {gpu_memory!r}")

    input_shape = (3, CLIP_FRAMES[clip], size, size)
    activations = {}
    with FakeTensorMode():
        for impl in IMPLS:
            model = create(name, num_classes, clip=clip, nonlocal_impl="auto" if impl == "nlnet" else impl, **overrides)
            params = sum(parameter.numel() for parameter in model.parameters())
            static = _static_bytes(model)
            room = None if memory is None else memory - static

            def measure(clips: int, model: nn.Module = model) -> int:
                return _saved_bytes(model, clips, input_shape, num_classes, AMP_DTYPES[amp])

            activations[impl] = _plan(measure, batch, room)
    return TrainingMemory(name, batch, input_shape, amp, params, static, activations, memory)


def _static_bytes(model: nn.Module) -> int:
    """Parameters and buffers, plus a gradient and an SGD momentum buffer for each trainable parameter."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return held + 2 * trainable


def _saved_bytes(
    model: nn.Module, batch: int, input_shape: tuple[int, ...], num_classes: int, amp: torch.dtype | None
) -> int:
    """Bytes one training forward (and its loss) saves for backward; call inside a FakeTensorMode."""
    model.train()
    clips = torch.empty(batch, *input_shape)
    labels = torch.zeros(batch, dtype=torch.long)
    exclude = [clips, labels, *model.parameters(), *model.buffers()]
    # Autocast on the CPU, the device of the fake tensors, casts the convolutions and matrix products to
    # bfloat16 as CUDA's does; its pools are made to keep their input's dtype, as CUDA's do.
    autocast = torch.autocast("cpu", amp or torch.float32, enabled=amp is not None)
    with SavedTensorCounter(exclude=exclude) as counter, autocast, _PoolsKeepDtype(enabled=amp is not None):
        F.cross_entropy(model(clips), labels)
    return counter.nbytes


class _PoolsKeepDtype(TorchFunctionMode):
    """Runs 3D pooling with autocast off, so that it returns its input's dtype.

    CPU autocast lists max_pool3d and avg_pool3d among the ops it runs in float32; CUDA autocast does not,
    so on the GPU the pools after the stem and res2 stay bfloat16. Without this the plan would keep a
    float32 map there, and a bfloat16 copy of it for the next convolution.
    """

    _POOLS = frozenset({F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, torch.max_pool3d})

    def __init__(self, enabled: bool) -> None:
        super().__init__()
        self.enabled = enabled

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.enabled and func in self._POOLS:
            with torch.autocast("cpu", enabled=False):
                return func(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _plan(measure: Callable[[int], int], batch: int, room: int | None) -> ActivationPlan:
    at_batch = measure(batch)
    per_sample = measure(batch + 1) - at_batch
    fixed = at_batch - per_sample * batch
    if room is None:
        return ActivationPlan(at_batch, per_sample, fixed, None)
    # The line predicts the largest batch; measuring there corrects for kernels that switch with the batch
    # (the pairwise part keeps a small affinity literally, a large one not).
    largest = max(0, math.floor((room - fixed) / per_sample)) if per_sample > 0 else 0
    while largest > 0 and measure(largest) > room:
        largest -= 1
    return ActivationPlan(at_batch, per_sample, fixed, largest)
