"""Process-group set-up for ``torchrun``: gloo on CPU, NCCL on CUDA, a no-op for a single process.

Every helper here works unchanged in a single process (world size 1), so the training loop has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistContext",
    "all_gather_objects",
    "all_reduce_mean",
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "broadcast_object",
    "cleanup_distributed",
    "configure_backends",
    "setup_distributed",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job.

    Attributes:
        rank: global rank, 0 .. world_size - 1.
        world_size: number of processes.
        local_rank: rank on this machine; picks the CUDA device.
        device: the device this process computes on.
        is_main: rank 0, the only process that logs and writes checkpoints.
        backend: "gloo", "nccl", or "none" for a single process.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool
    backend: str


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from err


def setup_distributed(device: str | None = None) -> DistContext:
    """Joins the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

    Args:
        device: "cpu" or "cuda" to force one; None picks CUDA when available.

    Returns:
        The context; without torchrun's variables (or with WORLD_SIZE=1) no process group is created.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = "none"
    if world_size > 1:
        backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, dev, rank == 0, backend)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def cleanup_distributed() -> None:
    """Leaves the process group, if one was joined."""
    global _host_group
    _host_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# A gloo group over the same processes, for agreeing on facts the host already knows (is this batch empty?).
# Under NCCL a collective on a CUDA tensor, read back with .item(), waits for every kernel queued before it;
# a CPU tensor through gloo costs one small message and leaves the GPU stream running ahead.
_host_group: Any = None


def _host() -> Any:
    global _host_group
    if dist.get_backend() == "gloo":
        return None  # the default group already works on CPU tensors
    if _host_group is None:
        _host_group = dist.new_group(backend="gloo")  # collective: every rank reaches it in the same call
    return _host_group


def barrier() -> None:
    """Waits for every process; returns at once in a single process."""
    if _active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over processes (a new tensor; the input is left unchanged)."""
    out = tensor.detach().clone()
    if _active():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over processes (a new tensor; the input is left unchanged)."""
    out = all_reduce_sum(tensor)
    if _active():
        out /= dist.get_world_size()
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """Picklable ``obj`` from every process, in rank order; ``[obj]`` in a single process."""
    if not _active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (a collective: every process must call it, in the same order).

    The flag travels as a CPU tensor over gloo, so asking never waits for queued GPU work.
    """
    if not _active():
        return bool(flag)
    value = torch.tensor([int(bool(flag))], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_host())
    return bool(value.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every process; ``obj`` itself in a single process."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_host())
    return box[0]


def configure_backends(device: torch.device | str, *, cudnn_benchmark: bool, tf32: bool) -> None:
    """On CUDA, enables cuDNN's algorithm search and TF32 float32 matmuls/convolutions; on CPU does nothing.

    Training clips all have one shape, so cuDNN's benchmark pays its search once; TF32 runs float32 matmuls
    and convolutions on tensor cores (10-bit mantissa products, float32 accumulation). Neither is on by
    default in PyTorch for matmuls, and cudnn.benchmark is off.
    """
    if torch.device(device).type != "cuda":
        return
    if cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
