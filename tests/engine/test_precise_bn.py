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


def small_nl_i3d() -> nn.Module:
    """NL-I3D at width 8 with one non-local block in res3, in training mode, seeded."""
    from nlnet.models import create

    torch.manual_seed(0)
    model = create("nl_i3d_r50", num_classes=3, stage_blocks=(1, 2, 1, 1), base_width=8, nonlocal_blocks={"res3": [1]})
    return model.train()


def captured_inputs(model: nn.Module, clips: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every BN layer's inputs over one plain training-mode forward per clip, as (samples, channels) float64.

    Runs under no_grad, as precise BN does; the model's running statistics are restored afterwards, so the
    captured inputs are what a forward in training mode (normalising by batch statistics) feeds each layer.
    """
    bns = {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    saved = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in bns.items()}
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in bns}

    def keep(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach().double()
            seen[name].append(x.movedim(1, -1).reshape(-1, x.shape[1]))

        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in bns.items()]
    try:
        with torch.no_grad():
            for clip in clips:
                model(clip)
    finally:
        for handle in handles:
            handle.remove()
    for name, (mean, var) in saved.items():
        bns[name].running_mean.copy_(mean)
        bns[name].running_var.copy_(var)
    missing = [name for name, parts in seen.items() if not parts]
    if missing:
        raise AssertionError(f"the forward never ran these BN layers: {missing}")
    return {name: torch.cat(parts) for name, parts in seen.items()}


def test_nl_i3d_res3_statistics_equal_the_exact_moments_of_their_inputs():
    model = small_nl_i3d()
    generator = torch.Generator().manual_seed(1)
    clips = [torch.randn(2, 3, 8, 32, 32, generator=generator) for _ in range(3)]
    inputs = captured_inputs(model, clips)
    nl_norms = [name for name in inputs if name.startswith("res3") and "nonlocal" in name]
    assert update_bn_stats(model, clips, len(clips)) == len(clips)
    modules = dict(model.named_modules())
    checked = []
    for name, samples in inputs.items():
        if not name.startswith("res3"):
            continue
        var, mean = torch.var_mean(samples, dim=0, correction=1)
        torch.testing.assert_close(modules[name].running_mean.double(), mean, rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(modules[name].running_var.double(), var, rtol=0, atol=1e-5, msg=name)
        checked.append(name)
    assert nl_norms and set(nl_norms) <= set(checked), (nl_norms, checked)
