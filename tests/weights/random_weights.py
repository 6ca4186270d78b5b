"""Random, non-trivial weights for by-value tests against another framework's network."""

from __future__ import annotations

import torch
from torch import nn


def randomise(model: nn.Module, nonlocal_marker: str, seed: int) -> None:
    """Every tensor random: BN statistics and γ too (the non-local output BN's, so that the block's path
    counts); the weights of tensors whose name holds ``nonlocal_marker`` smaller, because a dot-product block
    is cubic in its input and five in a row overflow."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var") or (name.endswith(".weight") and tensor.dim() == 1):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.75)
            elif tensor.dim() >= 2:
                gain = 0.3 if nonlocal_marker in name else 1.0
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * gain * (1.0 / fan_in) ** 0.5)
            else:
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
