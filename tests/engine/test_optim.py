"""The paper's optimiser: no weight decay on BN, decay on NL conv and fc biases, Nesterov SGD, LR steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nlnet.engine.optim import RelativeStepSchedule, WarmupStepSchedule, build_optimizer, build_scheduler
from nlnet.models import create


def test_parameter_groups_of_a_non_local_model():
    model = create(
        "nl_c2d_r50", num_classes=3, stage_blocks=(1, 1, 1, 1), base_width=4, nonlocal_blocks={"res3": [0]}
    )
    optimizer = build_optimizer(model, base_lr=0.01, weight_decay=1e-4, weight_decay_bn=0.0)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    bn_names = {
        f"{m_name}.{p_name}"
        for m_name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for p_name, _ in m.named_parameters(recurse=False)
    }
    assert len(decay_of) == len(names)
    for name, p in names.items():
        assert decay_of[id(p)] == (0.0 if name in bn_names else 1e-4), name
    nl = [n for n in names if "nonlocal_block" in n]
    assert "res3.0.nonlocal_block.out.bias" in nl and "res3.0.nonlocal_block.norm.weight" in nl
    assert decay_of[id(names["res3.0.nonlocal_block.out.bias"])] == 1e-4
    assert decay_of[id(names["res3.0.nonlocal_block.theta.bias"])] == 1e-4
    assert decay_of[id(names["res3.0.nonlocal_block.norm.weight"])] == 0.0
    assert decay_of[id(names["head.fc.bias"])] == 1e-4
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in optimizer.param_groups)


def test_frozen_parameters_are_left_out():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    model[1].weight.requires_grad_(False)
    optimizer = build_optimizer(model, base_lr=0.1)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(params) == 3 and all(p is not model[1].weight for p in params)


def test_two_nesterov_steps_with_coupled_weight_decay_by_hand():
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(2.0)
        model[1].weight.fill_(3.0)
    optimizer = build_optimizer(model, base_lr=0.1, momentum=0.9, weight_decay=0.5, weight_decay_bn=0.0)
    w, gamma = 2.0, 3.0
    buf_w = buf_g = 0.0
    for grad in (1.0, -2.0):
        model[0].weight.grad = torch.full_like(model[0].weight, grad)
        model[1].weight.grad = torch.full_like(model[1].weight, grad)
        model[1].bias.grad = torch.zeros_like(model[1].bias)
        optimizer.step()
        d_w, d_g = grad + 0.5 * w, grad  # decay is added to the gradient, except for BN
        buf_w = d_w if buf_w == 0.0 else 0.9 * buf_w + d_w
        buf_g = d_g if buf_g == 0.0 else 0.9 * buf_g + d_g
        w -= 0.1 * (d_w + 0.9 * buf_w)
        gamma -= 0.1 * (d_g + 0.9 * buf_g)
    assert model[0].weight.item() == pytest.approx(w, rel=1e-6)
    assert model[1].weight.item() == pytest.approx(gamma, rel=1e-6)


def test_steps_with_relative_lrs():
    schedule = RelativeStepSchedule([0, 150000, 300000], [1, 0.1, 0.01])
    assert [schedule(i) for i in (0, 149999, 150000, 299999, 300000, 399999)] == [1, 1, 0.1, 0.1, 0.01, 0.01]
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.01)
    scheduler = build_scheduler(optimizer, [0, 3], [1, 0.1])
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.001, 0.001])
    with pytest.raises(ValueError, match="start at 0"):
        RelativeStepSchedule([5, 10], [1, 0.1])
    with pytest.raises(ValueError, match="same non-zero length"):
        RelativeStepSchedule([0, 10], [1])


def test_adamw_keeps_the_bn_exemption_and_decouples_decay():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    optimizer = build_optimizer(model, base_lr=0.1, weight_decay=0.5, weight_decay_bn=0.0, name="adamw")
    assert isinstance(optimizer, torch.optim.AdamW)
    assert {g["name"]: g["weight_decay"] for g in optimizer.param_groups} == {"decay": 0.5, "bn": 0.0}
    # With zero gradients Adam's update is 0, so the only change is the decoupled decay p <- p (1 - lr wd).
    before = model[0].weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.testing.assert_close(model[0].weight.detach(), before * (1 - 0.1 * 0.5))
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer(model, base_lr=0.1, name="adam")


def test_onecycle_warms_up_then_anneals_to_near_zero():
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, base_lr=0.01, name="adamw")
    scheduler = build_scheduler(optimizer, [0], [1.0], kind="onecycle", max_iter=100, warmup_fraction=0.2)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = max(range(100), key=lrs.__getitem__)
    assert lrs[0] == pytest.approx(0.01 / 25)
    assert abs(peak - 0.2 * 99) <= 1 and lrs[peak] == pytest.approx(0.01, rel=1e-3)
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1 : peak + 1], strict=True))
    assert all(a >= b for a, b in zip(lrs[peak:-1], lrs[peak + 1 :], strict=True))
    assert lrs[-1] < 0.01 * 1e-3
    with pytest.raises(ValueError, match="max_iter"):
        build_scheduler(optimizer, [0], [1.0], kind="onecycle")
    with pytest.raises(ValueError, match="schedule must be one of"):
        build_scheduler(optimizer, [0], [1.0], kind="cosine", max_iter=10)


def test_warmup_then_step_decay():
    # The detection recipe's schedule: decay steps [20, 30] with gamma 0.1 as the step table.
    schedule = WarmupStepSchedule([0, 20, 30], [1.0, 0.1, 0.1**2], warmup_iters=10, warmup_factor=0.1)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(5) == pytest.approx(0.1 * 0.5 + 0.5)
    assert [schedule(i) for i in (10, 19, 20, 29, 30, 100)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = build_scheduler(optimizer, [0, 2], [1.0, 0.1], kind="warmup_steps", warmup_iters=2, warmup_factor=0.5)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.25, 0.375, 0.05, 0.05])


def test_scaled_parameters_get_their_multiple_of_the_scheduled_rate():
    # The detectors' train.nonlocal_lr_mult: the blocks' parameters (a BN among them) at lr_mult times the rest,
    # each keeping its weight decay, and the warm-up/step schedule applied to every group alike.
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)))
    scaled = list(model[1].parameters())
    optimizer = build_optimizer(model, base_lr=0.1, weight_decay=1e-4, scaled=scaled, lr_mult=10.0)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert sorted(groups) == ["bn_scaled", "decay", "decay_scaled"]
    assert [id(p) for p in groups["decay"]["params"]] == [id(p) for p in model[0].parameters()]
    assert {id(p) for p in groups["decay_scaled"]["params"]} == {id(p) for p in model[1][0].parameters()}
    assert {id(p) for p in groups["bn_scaled"]["params"]} == {id(p) for p in model[1][1].parameters()}
    assert groups["decay_scaled"]["weight_decay"] == 1e-4 and groups["bn_scaled"]["weight_decay"] == 0.0
    scheduler = build_scheduler(optimizer, [0, 2], [1.0, 0.1], kind="warmup_steps", warmup_iters=2, warmup_factor=0.5)
    seen = []
    for _ in range(3):
        seen.append([groups[n]["lr"] for n in ("decay", "decay_scaled", "bn_scaled")])
        optimizer.step()
        scheduler.step()
    assert seen == [pytest.approx(v) for v in ([0.05, 0.5, 0.5], [0.075, 0.75, 0.75], [0.01, 0.1, 0.1])]
    with pytest.raises(ValueError, match="lr_mult must be > 0, got 0.0"):
        build_optimizer(model, base_lr=0.1, scaled=scaled, lr_mult=0.0)
