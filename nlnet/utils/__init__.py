"""Small helpers that are not layers: exact accounting of what autograd keeps."""

from nlnet.utils.memory import SavedTensorCounter, saved_activation_bytes

__all__ = ["SavedTensorCounter", "saved_activation_bytes"]
