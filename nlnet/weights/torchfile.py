"""Read the tensors of someone else's ``torch.save`` file without running any of the code its pickle names.

mmengine and PySlowFast checkpoints hold more than weights: numpy arrays and scalars, mmengine's message-hub
objects (``mmengine.logging.HistoryBuffer``), optimiser state, config text. ``torch.load(weights_only=True)``
refuses the whole file at the first class it does not know, and ``weights_only=False`` would import and call
whatever the pickle names. `read_torch_file` sits between: tensors, plain containers and numpy values are
rebuilt; every other class is replaced by an inert `Unread` record of its name, which is never called.
"""

from __future__ import annotations

import collections
import os
import pickle
import types
from dataclasses import dataclass, field

import torch

from nlnet.weights.caffe2 import _allowed_globals as _numpy_globals


class Unread:
    """Stands in for an object of a class the reader refused; keeps only the class's qualified name."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        # Called by pickle with the refused class's constructor arguments, which are dropped unread.
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def __call__(self, *args: object, **kwargs: object) -> Unread:
        # A refused callable that a pickle calls (getattr(cls, "method")(...)) yields the record itself.
        return self

    def __repr__(self) -> str:
        return f"<unread {self.qualified_name}>"

    # Set on the per-class subclass made in `_placeholder`.
    qualified_name = "?"


def _placeholder(module: str, name: str, seen: set[str]) -> type[Unread]:
    seen.add(f"{module}.{name}")
    return type(name, (Unread,), {"qualified_name": f"{module}.{name}"})


def _tensor_globals() -> dict[tuple[str, str], object]:
    # What torch.save writes for tensors and parameters (storages are resolved by torch before find_class).
    allowed: dict[tuple[str, str], object] = {
        ("torch._utils", name): getattr(torch._utils, name)
        for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state")
    }
    allowed[("torch._tensor", "_rebuild_from_type_v2")] = torch._tensor._rebuild_from_type_v2
    allowed[("torch.nn.parameter", "Parameter")] = torch.nn.Parameter
    allowed[("torch", "Tensor")] = torch.Tensor
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch", "device")] = torch.device
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    for plain in (set, frozenset, complex, bytearray, slice):
        allowed[("builtins", plain.__name__)] = plain
    for value in vars(torch).values():
        if isinstance(value, torch.dtype):
            allowed[("torch", str(value).removeprefix("torch."))] = value
    return allowed


_ALLOWED = {**_tensor_globals(), **_numpy_globals()}


def _restricted_pickle_module(refused: set[str]) -> types.ModuleType:
    """A stand-in for the ``pickle`` module whose Unpickler resolves only `_ALLOWED` names."""

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            found = _ALLOWED.get((module, name))
            return found if found is not None else _placeholder(module, name, refused)

    module = types.ModuleType("nlnet_restricted_pickle")
    module.Unpickler = RestrictedUnpickler
    module.load = lambda handle, **kwargs: RestrictedUnpickler(handle, **kwargs).load()
    module.__name__ = "nlnet_restricted_pickle"
    return module


@dataclass
class TorchFile:
    """The content of a file read by `read_torch_file`.

    Attributes:
        content: the unpickled object, with refused classes as `Unread` records.
        refused: qualified names of the classes that were not loaded (nothing of theirs was run).
    """

    content: object
    refused: list[str] = field(default_factory=list)


def read_torch_file(path: str | os.PathLike) -> TorchFile:
    """Read a ``torch.save`` file (zip or legacy) on the CPU, resolving only tensors, numpy and plain types.

    Raises:
        ValueError: the file is not a readable ``torch.save`` file.
    """
    refused: set[str] = set()
    try:
        # weights_only=False only lets torch use the pickle module given here, whose find_class is the
        # allowlist above; nothing outside it is imported or called.
        content = torch.load(
            os.fspath(path), map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module(refused)
        )
    except Exception as error:  # truncated files and non-pickles raise many different errors
        raise ValueError(f"{os.fspath(path)} is not a readable torch.save file: {error}") from error
    return TorchFile(content, sorted(refused))


def tensors_of(mapping: object, where: str) -> dict[str, torch.Tensor]:
    """Check that ``mapping`` is {name: tensor} and return it as a plain dict.

    Raises:
        ValueError: it is not a mapping, or an entry is not a tensor (naming the entry and ``where``).
    """
    if not isinstance(mapping, dict):
        raise ValueError(f"{where}: expected a dict of tensors, got {type(mapping).__name__}")
    for name, value in mapping.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: entry {name!r} is a {type(value).__name__}, not a tensor")
    return {str(name): value for name, value in mapping.items()}
