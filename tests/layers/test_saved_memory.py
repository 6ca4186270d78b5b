"""The saved-activation counter counts exactly what autograd keeps, and nlnet's block keeps less than the
explicit N×M path (an exact property, not a timing)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nlnet import NonLocalBlock
from nlnet.layers import pairwise
from nlnet.utils import SavedTensorCounter, saved_activation_bytes

MODES = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")
# NL-I3D res3 (C=512, 4×28×28, batch 2) and res4 (C=1024, 4×14×14) scaled by 1/4 in channels and in positions.
RES3, RES4 = (128, (4, 14, 14)), (256, (1, 14, 14))


def test_counts_a_saved_result_once_at_its_size():
    x = torch.randn(3, 5, requires_grad=True)
    with SavedTensorCounter(exclude=[x]) as counter:
        y = x.exp()  # exp saves its result for backward
    assert counter.nbytes == y.nbytes == 3 * 5 * 4
    assert counter.num_storages == 1


def test_excludes_inputs_parameters_and_their_views():
    x = torch.randn(4, 6, requires_grad=True)
    weight = nn.Parameter(torch.randn(6))
    with SavedTensorCounter(exclude=[x, weight]) as counter:
        (x[:, :3] * weight[:3]).sum()  # mul saves both operands: views of excluded storages
    assert counter.nbytes == 0


def test_counts_an_intermediate_kept_for_a_parameter_gradient():
    x = torch.randn(4, 6, requires_grad=True)
    weight = nn.Parameter(torch.randn(6))
    with SavedTensorCounter(exclude=[x, weight]) as counter:
        hidden = x * 2.0  # multiplying by a Python number saves nothing
        hidden * weight  # saves hidden (for weight's gradient) and weight (excluded)
    assert counter.nbytes == hidden.nbytes == 4 * 6 * 4


def test_a_view_counts_its_whole_storage_and_repeated_saves_count_once():
    x = torch.randn(8, 10, requires_grad=True)
    weight = nn.Parameter(torch.randn(2))
    with SavedTensorCounter(exclude=[x, weight]) as counter:
        hidden = x * 3.0
        part = hidden[:, :2]  # a view into hidden's (8, 10) storage
        part * weight
        part * part  # saves the same storage twice more
    assert counter.num_storages == 1
    assert counter.nbytes == hidden.untyped_storage().nbytes() == 8 * 10 * 4


def test_module_helper_excludes_parameters_and_inputs():
    torch.manual_seed(0)
    linear = nn.Linear(7, 5)
    x = torch.randn(3, 7, requires_grad=True)
    assert saved_activation_bytes(linear, x) == 0  # keeps only x and its weight
    relu_net = nn.Sequential(nn.Linear(7, 5), nn.ReLU())
    assert saved_activation_bytes(relu_net, x) == 3 * 5 * 4  # + the ReLU output
    double = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 2))
    # tanh saves its output, which the second linear also saves: one (3, 5) storage.
    assert saved_activation_bytes(double, x) == 3 * 5 * 4


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("channels", "size"),
    [
        # res4: 784 -> 196 = 1×14×14 positions: every saved tensor (N×C, M×C or N×M) shrinks by the same factor
        # 16, so the ratio is the paper shape's ratio. At res4 there are fewer keys than C/2, and the block keeps
        # W_z y instead of recomputing it.
        RES3,
        RES4,
    ],
    ids=["res3", "res4"],
)
def test_block_saves_at_most_three_quarters_of_the_explicit_path(mode, channels, size):
    torch.manual_seed(0)
    fast = NonLocalBlock(channels, mode=mode).train()
    explicit = NonLocalBlock(channels, mode=mode, impl="explicit").train()
    explicit.load_state_dict(fast.state_dict())
    x = torch.randn(2, channels, *size, requires_grad=True)
    fast_bytes = saved_activation_bytes(fast, x)
    explicit_bytes = saved_activation_bytes(explicit, x)
    # The explicit path keeps at least its (B, N, M) weights: a sanity floor for the counter itself.
    queries, keys = size[0] * size[1] * size[2], size[0] * (size[1] // 2) * (size[2] // 2)
    assert explicit_bytes >= 2 * queries * keys * 4
    assert fast_bytes <= 0.75 * explicit_bytes, (mode, fast_bytes, explicit_bytes)


def _saved_tensors(module: nn.Module, x: torch.Tensor) -> list[tuple[tuple[int, ...], int]]:
    """(shape, elements of its whole storage) of every tensor ``module(x)`` saves for backward, except x, the
    parameters, the buffers and views of them."""
    excluded = {t.untyped_storage().data_ptr() for t in (x, *module.parameters(), *module.buffers())}
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in excluded:
            saved.append((tuple(tensor.shape), tensor.untyped_storage().nbytes() // tensor.element_size()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x)
    return saved


@pytest.mark.parametrize("position", ("before", "after"))
@pytest.mark.parametrize("mode", (*MODES, "gaussian-chunked"))
@pytest.mark.parametrize(("channels", "size"), [RES3, RES4], ids=["res3", "res4"])
def test_block_keeps_nothing_of_size_n_by_m(monkeypatch, mode, channels, size, position):
    # The README's promise: nothing of size N×M is kept for backward, except in Gaussian mode where the affinity
    # is under EXPLICIT_AFFINITY_BYTES (values narrower than the keys rule out SDPA, and there the explicit
    # product is the fastest exact path): res3 here, 2·784·196 floats. Past that size (forced: gaussian-chunked),
    # or with few keys (res4: 49 keys for 128 value channels), the chunked kernel keeps two numbers per query.
    if mode == "gaussian-chunked":
        mode = "gaussian"
        monkeypatch.setattr(pairwise, "EXPLICIT_AFFINITY_BYTES", 0)
    explicit_product = mode == "gaussian" and pairwise.EXPLICIT_AFFINITY_BYTES > 0 and (channels, size) == RES3
    torch.manual_seed(0)
    block = NonLocalBlock(channels, mode=mode, pool_position=position).train()
    x = torch.randn(2, channels, *size, requires_grad=True)
    batch, queries, keys = 2, math.prod(size), size[0] * (size[1] // 2) * (size[2] // 2)
    saved = _saved_tensors(block, x)
    pairwise_shaped = [(shape, elements) for shape, elements in saved if queries in shape and keys in shape]
    if explicit_product:
        assert pairwise_shaped and all(elements == batch * queries * keys for _, elements in pairwise_shaped)
    else:
        assert not pairwise_shaped, pairwise_shaped
    if (channels, size) == RES3:
        # N·M = 153 664 is more than any (B, N, d) or (B, C, M) tensor holds, and less than the BN input W_z y
        # (B, C, N), which the block recomputes here (≥ C/2 keys): by size alone, nothing else comes near.
        others = [(shape, elements) for shape, elements in saved if (shape, elements) not in pairwise_shaped]
        assert all(elements < queries * keys for _, elements in others), others
