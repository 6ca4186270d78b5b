"""The training-memory planner against real CPU forwards of a tiny network, and its command line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nlnet.cli import main
from nlnet.models import create, describe
from nlnet.models.memory import parse_memory_size, training_memory
from nlnet.utils.memory import SavedTensorCounter

# A tiny NL I3D with one non-local block after res3's first block, on 32-frame 64 x 64 clips.
TINY = {"base_width": 8, "stage_blocks": (1, 2, 1, 1), "nonlocal_blocks": {"res3": [0]}}
FRAMES, SIZE, BATCH = 32, 64, 2


def _real_saved_bytes(batch: int, impl: str) -> int:
    """What a real CPU training forward (and its loss) saves for backward."""
    torch.manual_seed(0)
    model = create("nl_i3d_r50", clip="32x2", nonlocal_impl=impl, **TINY).train()
    clips = torch.randn(batch, 3, FRAMES, SIZE, SIZE)
    labels = torch.zeros(batch, dtype=torch.long)
    with SavedTensorCounter(exclude=[clips, labels, *model.parameters(), *model.buffers()]) as counter:
        F.cross_entropy(model(clips), labels)
    return counter.nbytes


@pytest.fixture(scope="module")
def plan():
    return training_memory("nl_i3d_r50", BATCH, clip="32x2", size=SIZE, **TINY)


def test_planned_activations_match_a_real_cpu_forward(plan):
    for impl, explicit in (("nlnet", "auto"), ("explicit", "explicit")):
        real = _real_saved_bytes(BATCH, explicit)
        assert abs(plan.activations[impl].at_batch - real) <= 0.05 * real, impl


def test_explicit_blocks_keep_at_least_their_affinity(plan):
    # 32 x 2 clips reach res3 at 1/8 of the frames and of the side (paper Table 1: 4 x 28 x 28 from 32 x 224);
    # keys are max-pooled 1 x 2 x 2.
    queries = (FRAMES // 8) * (SIZE // 8) ** 2
    keys = (FRAMES // 8) * (SIZE // 16) ** 2
    affinity_bytes = BATCH * queries * keys * 4
    extra = plan.activations["explicit"].at_batch - plan.activations["nlnet"].at_batch
    assert extra >= affinity_bytes


def test_static_memory_is_parameters_gradients_and_momentum(plan):
    model = create("nl_i3d_r50", **TINY)
    parameter_bytes = 4 * sum(p.numel() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    assert plan.static_bytes == 3 * parameter_bytes + buffer_bytes
    assert plan.total("nlnet") == plan.static_bytes + plan.activations["nlnet"].at_batch


def test_largest_batch_is_the_one_that_fits_real_memory():
    real_at_3 = _real_saved_bytes(3, "auto")
    model = create("nl_i3d_r50", **TINY)
    parameter_bytes = 4 * sum(p.numel() for p in model.parameters())
    static = 3 * parameter_bytes + sum(b.numel() * b.element_size() for b in model.buffers())
    plan = training_memory("nl_i3d_r50", 1, size=SIZE, gpu_memory=static + real_at_3 + 1000, **TINY)
    assert plan.activations["nlnet"].largest_batch == 3


def test_bf16_keeps_less_than_float32(plan):
    bf16 = training_memory("nl_i3d_r50", BATCH, size=SIZE, amp="bf16", **TINY)
    # Not half: max-pool indices (int64), batch-norm statistics and the loss stay as they are.
    assert bf16.activations["nlnet"].per_sample < 0.85 * plan.activations["nlnet"].per_sample
    assert bf16.static_bytes == plan.static_bytes


@pytest.mark.parametrize(("text", "nbytes"), [("80GiB", 80 * 2**30), ("80 GB", 80 * 10**9), ("1.5kib", 1536)])
def test_memory_sizes(text: str, nbytes: int):
    assert parse_memory_size(text) == nbytes


@pytest.mark.parametrize("text", ["80XB", "GiB", "-1GiB", "0"])
def test_bad_memory_sizes_are_refused(text: str):
    with pytest.raises(ValueError, match="memory size"):
        parse_memory_size(text)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="batch"):
        training_memory("nl_i3d_r50", 0)
    with pytest.raises(ValueError, match="clip"):
        training_memory("nl_i3d_r50", 1, clip="16x4")
    with pytest.raises(ValueError, match="amp"):
        training_memory("nl_i3d_r50", 1, amp="fp8")
    with pytest.raises(ValueError, match="nonlocal_impl"):
        training_memory("nl_i3d_r50", 1, nonlocal_impl="explicit")


def test_cli_prints_the_table(capsys):
    argv = ["info", "nl_i3d_r50", "--train-memory", "--batch", "2", "--clip", "8x8", "--size", "32"]
    assert main([*argv, "--gpu-memory", "1GiB", "--nonlocal-blocks", "res3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "model       nl_i3d_r50, batch 2 of 3x8x32x32, float32, train mode"
    rows = {line[:44].strip(): line[44:].split() for line in lines[1:-1]}
    static = rows["parameters + gradients + SGD momentum"]
    # Three float32 copies of the parameters of the net with res3's two blocks (describe counts them);
    # batch-norm buffers add less than 0.01 GiB.
    params = describe("nl_i3d_r50", nonlocal_blocks="res3").params
    assert static == [f"{3 * 4 * params / 2**30:.2f}"] * 2
    assert set(rows) >= {"activations kept for backward", "total", "largest batch in 1.00 GiB"}
    nlnet_fits, explicit_fits = map(int, rows["largest batch in 1.00 GiB"])
    assert nlnet_fits >= explicit_fits > 0


def test_cli_refuses_a_bad_memory_size(capsys):
    assert main(["info", "nl_i3d_r50", "--train-memory", "--gpu-memory", "80XB"]) == 2
    err = capsys.readouterr().err
    assert "80XB" in err and "gib" in err and err.count("\n") == 1
