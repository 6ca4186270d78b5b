"""Hand-built models whose non-local block attends where the test says, for the viz tests.

The model feeds its block one-hot position codes at a fixed feature grid, whatever the frames are; the frame
size alone sets the stride. θ sends every query's code to the code of a chosen target position and φ is the
identity, so with a large code amplitude each query puts (almost) all its weight on the key cell whose pooling
window contains its target.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from nlnet import NonLocalBlock

AMPLITUDE = 30.0


class CodedBlockModel(nn.Module):
    """Frames -> fixed one-hot codes on ``grid`` -> one non-local block -> a scalar."""

    def __init__(self, grid: tuple[int, ...], targets: dict[int, int] | None, pool, pool_position="before"):
        super().__init__()
        positions = math.prod(grid)
        self.grid = grid
        codes = torch.eye(positions).reshape(1, positions, *grid) * AMPLITUDE
        self.register_buffer("codes", codes)
        self.block = NonLocalBlock(
            positions, positions, dim=len(grid), pool=pool, pool_position=pool_position, norm=None
        )
        with torch.no_grad():
            theta = torch.zeros(positions, positions)
            for source, target in (targets or {}).items():
                theta[target, source] = 1.0
            self.block.theta.weight.copy_(theta.reshape(self.block.theta.weight.shape))
            self.block.theta.bias.zero_()
            self.block.phi.weight.copy_(torch.eye(positions).reshape(self.block.phi.weight.shape))
            self.block.phi.bias.zero_()

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.block(self.codes.expand(frames.shape[0], *self.codes.shape[1:])).mean()


def flat(position: tuple[int, ...], grid: tuple[int, ...]) -> int:
    return int(np.ravel_multi_index(position, grid))


def midpoint(first: int, last: int) -> float:
    return (first + last) / 2
