"""Tensor-in, tensor-out building blocks; nothing here knows about videos, datasets or training."""

from nlnet.layers.nonlocal_block import NonLocalBlock

__all__ = ["NonLocalBlock"]
