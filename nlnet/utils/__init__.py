"""Small helpers that are not layers: atomic file writes, exact accounting of what autograd keeps."""

from nlnet.utils.io import atomic_write
from nlnet.utils.memory import SavedTensorCounter, saved_activation_bytes

__all__ = ["SavedTensorCounter", "atomic_write", "saved_activation_bytes"]
