"""Exact activation memory: the bytes of the tensors autograd keeps from a forward pass for its backward.

Peak process memory is noisy (allocator caching, other threads, the OS); what a layer *saves* for
backward is not. :class:`SavedTensorCounter` hooks ``torch.autograd.graph.saved_tensors_hooks`` and
records every tensor an autograd node saves (``ctx.save_for_backward`` included), counting each underlying
storage once at its full size, so views and repeated saves of one tensor are not double-counted. Storages
of tensors the caller excludes (the input, the parameters and buffers) are skipped: they exist whether or
not a graph is kept.

Meta and fake tensors (``torch._subclasses.FakeTensorMode``) are counted too, so the activation memory of a
full-size network can be planned without allocating it.

Limits: tensors a custom ``autograd.Function`` stores as plain ``ctx`` attributes, and inputs that
``torch.utils.checkpoint`` keeps by reference, bypass the hooks and are not counted. While hooks are
installed autograd does not check saved tensors for in-place modification, so a backward that must catch
such bugs has to run outside the counter.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any

import torch
from torch import nn

StorageKey = tuple[str, int]


def _storage_key(tensor: torch.Tensor) -> StorageKey | None:
    """(device, address) of the tensor's storage, or None for tensors without one (e.g. nested).

    Real storages are told apart by their data pointer. Meta and fake tensors (whose storage is on the meta
    device) have no data, so the address of the storage object itself stands in; it is unique only while the
    storage lives, so the counter holds on to the data-less storages it counts.
    """
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    if storage.device.type == "meta":
        return "meta", storage._cdata
    if storage.data_ptr() == 0:
        return None
    return str(tensor.device), storage.data_ptr()


class SavedTensorCounter:
    """Context manager that counts the bytes autograd saves for backward inside its ``with`` block.

    Args:
        exclude: tensors whose storages are not counted (typically the inputs, parameters and buffers).

    Example::

        with SavedTensorCounter(exclude=[x, *block.parameters()]) as counter:
            y = block(x)
        counter.nbytes  # activation bytes kept alive by y's graph
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {key for key in map(_storage_key, exclude) if key is not None}
        self._saved: dict[StorageKey, int] = {}
        self._dataless: list[torch.UntypedStorage] = []  # keeps the keys of meta storages unique (they cost nothing)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key is not None and key not in self._excluded:
            storage = tensor.untyped_storage()
            self._saved[key] = storage.nbytes()
            if storage.device.type == "meta":
                self._dataless.append(storage)
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @property
    def nbytes(self) -> int:
        """Total bytes of the distinct saved storages seen so far."""
        return sum(self._saved.values())

    @property
    def num_storages(self) -> int:
        """Number of distinct saved storages seen so far."""
        return len(self._saved)

    def __enter__(self) -> SavedTensorCounter:
        self._hooks.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._hooks.__exit__(exc_type, exc, traceback)


def saved_activation_bytes(module: nn.Module, *inputs: torch.Tensor, **kwargs: Any) -> int:
    """Bytes of the activations ``module(*inputs, **kwargs)`` keeps for backward.

    The inputs (and any tensor keyword arguments), the module's parameters and its buffers are excluded, as
    are views of them. The forward output is discarded.

    Args:
        module: the module to run; put it in the mode (train/eval) you want measured.
        *inputs: positional tensor inputs, e.g. a (B, C, T, H, W) clip.
        **kwargs: keyword arguments passed to the forward.

    Returns:
        The number of bytes.
    """
    exclude = [*inputs, *(v for v in kwargs.values() if isinstance(v, torch.Tensor))]
    exclude += [*module.parameters(), *module.buffers()]
    with SavedTensorCounter(exclude=exclude) as counter:
        module(*inputs, **kwargs)
    return counter.nbytes
