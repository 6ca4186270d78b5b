"""Precise BN sets running statistics to the exact mean/variance of each BN layer's inputs over the batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nlnet.engine.precise_bn import update_bn_stats


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    frozen = nn.BatchNorm3d(4)
    return nn.Sequential(
        nn.Conv3d(3, 4, 1),
        nn.BatchNorm3d(4),
        nn.ReLU(),
        frozen,
        nn.Conv3d(4, 5, 1),
        nn.BatchNorm3d(5),
        nn.Dropout(),
    )


def test_running_statistics_equal_those_of_all_inputs_together():
    model = _net()
    model.train()
    model[3].eval()  # a frozen BN layer keeps its statistics
    frozen_before = (model[3].running_mean.clone(), model[3].running_var.clone())
    batches = [torch.randn(2, 3, 2, 3, 3) * (i + 1) + i for i in range(4)]

    inputs: dict[int, list[torch.Tensor]] = {1: [], 5: []}
    hooks = [
        model[i].register_forward_pre_hook(lambda m, x, i=i: inputs[i].append(x[0].detach())) for i in inputs
    ]
    with torch.no_grad():
        for clip in batches[:3]:
            model(clip)
    for hook in hooks:
        hook.remove()

    torch.manual_seed(123)
    expected_rng = torch.rand(3)
    torch.manual_seed(123)
    used = update_bn_stats(model, iter(batches), num_batches=3)
    assert used == 3
    assert torch.equal(torch.rand(3), expected_rng), "precise BN must not consume the training RNG"
    for i, seen in inputs.items():
        x = torch.cat(seen).transpose(0, 1).reshape(model[i].num_features, -1).double()
        torch.testing.assert_close(model[i].running_mean, x.mean(1).float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            model[i].running_var, x.var(1, unbiased=True).float(), rtol=1e-5, atol=1e-6
        )
    assert torch.equal(model[3].running_mean, frozen_before[0])
    assert torch.equal(model[3].running_var, frozen_before[1])


def test_model_must_be_in_training_mode():
    with pytest.raises(ValueError, match="training mode"):
        update_bn_stats(_net().eval(), [torch.randn(2, 3, 1, 2, 2)], 1)
