"""The block's fused autograd Functions (``nlnet.layers.projection``) against the torch ops they replace: values,
gradients (ties routed as max_pool routes them), double backward, what they save, deterministic mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nlnet.layers.projection import _MAX_POOL, _MaxPool, _PoolProject, _ProjectBatchNorm
from nlnet.utils import SavedTensorCounter

KERNELS = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}


def _conv_params(channels: int, dim: int, sizes=(3, 4)) -> list[torch.Tensor]:
    """Weights and biases of two 1×1 convolutions (φ and g) of ``channels`` inputs, float64, requiring grad."""
    params = []
    for out_channels in sizes:
        params += [torch.randn(out_channels, channels, *([1] * dim), dtype=torch.float64, requires_grad=True)]
        params += [torch.randn(out_channels, dtype=torch.float64, requires_grad=True)]
    return params


def _ties(*shape: int) -> torch.Tensor:
    """Post-ReLU-like values rounded to integers: many windows hold their maximum twice or more."""
    return torch.randn(*shape, dtype=torch.float64).round().clamp_min(0).requires_grad_(True)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_pooled_projection_keeps_only_its_input_and_matches_pool_then_project(dim):


    kernel = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}[dim]
    x = torch.randn(2, 5, *([5] * dim), dtype=torch.float64, requires_grad=True)  # odd sizes: floor, as max_pool
    params = []
    for out_channels in (3, 4):  # two 1×1 convolutions (φ and g) of the same pooled input
        params += [torch.randn(out_channels, 5, *([1] * dim), dtype=torch.float64, requires_grad=True)]
        params += [torch.randn(out_channels, dtype=torch.float64, requires_grad=True)]
    pooled = _MAX_POOL[dim](x, kernel, kernel).flatten(2)
    pairs = zip(params[::2], params[1::2], strict=True)
    expected = torch.cat([w.flatten(1) @ pooled + b[:, None] for w, b in pairs], dim=1)
    torch.testing.assert_close(_PoolProject.apply(x, kernel, *params), expected)
    assert torch.autograd.gradcheck(lambda *t: _PoolProject.apply(t[0], kernel, *t[1:]), (x, *params))
    with SavedTensorCounter(exclude=[x, *params]) as counter:
        _PoolProject.apply(x, kernel, *params)
        _MaxPool.apply(x, kernel)
    assert counter.nbytes == 0


def test_window_max_routes_ties_as_max_pool_does():


    # ReLU outputs tie at 0 all the time: the gradient must reach the window's first maximum, as max_pool's.
    x = torch.randn(2, 3, 4, 6, 7, dtype=torch.float64).round().clamp_min(0).requires_grad_(True)
    for kernel in [(1, 2, 2), (2, 2, 2), (2, 3, 1), (1, 1, 3)]:
        reference = x.detach().clone().requires_grad_(True)
        pooled = _MaxPool.apply(x, kernel)
        expected = _MAX_POOL[3](reference, kernel, kernel)
        assert torch.equal(pooled, expected)
        grad = torch.randn_like(pooled)
        assert torch.equal(torch.autograd.grad(pooled, x, grad)[0], torch.autograd.grad(expected, reference, grad)[0])


@pytest.mark.parametrize("kernel", [(1, 2, 2), (2, 2, 2), (2, 3, 1)])
def test_pooled_projection_routes_ties_as_max_pool_does(kernel):
    x = _ties(2, 3, 4, 6, 7)
    params = _conv_params(3, 3)
    reference = x.detach().clone().requires_grad_(True)
    pooled = _MAX_POOL[3](reference, kernel, kernel).flatten(2)
    pairs = zip(params[::2], params[1::2], strict=True)
    expected = torch.cat([w.flatten(1) @ pooled + b[:, None] for w, b in pairs], dim=1)
    got = _PoolProject.apply(x, kernel, *params)
    grad = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(expected, reference, grad)[0])


def test_pooling_gradients_in_deterministic_mode_equal_the_usual_ones(deterministic_algorithms):
    # max_unpool has no deterministic implementation: the gradient is a scatter to max_pool's own argmax.
    x = _ties(2, 3, 4, 6, 7)
    params = _conv_params(3, 3)
    for kernel in [(1, 2, 2), (2, 2, 2)]:
        torch.use_deterministic_algorithms(True)
        pooled, projected = _MaxPool.apply(x, kernel), _PoolProject.apply(x, kernel, *params)
        grads = torch.autograd.grad((pooled.sum(), projected.square().sum()), (x, *params))
        torch.use_deterministic_algorithms(False)
        pooled, projected = _MaxPool.apply(x, kernel), _PoolProject.apply(x, kernel, *params)
        expected = torch.autograd.grad((pooled.sum(), projected.square().sum()), (x, *params))
        for got, want in zip(grads, expected, strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_pooling_functions_differentiate_twice(dim):
    kernel = KERNELS[dim]
    x = torch.randn(2, 3, *{1: (5,), 2: (4, 5), 3: (2, 4, 5)}[dim], dtype=torch.float64, requires_grad=True)
    params = _conv_params(3, dim)
    project = lambda *t: _PoolProject.apply(t[0], kernel, *t[1:])  # noqa: E731
    assert torch.autograd.gradgradcheck(project, (x, *params), fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda t: _MaxPool.apply(t, kernel), (x,), fast_mode=True)


def test_projected_batch_norm_matches_conv_then_batch_norm_and_differentiates_twice():
    y = torch.randn(3, 10, 4, dtype=torch.float64, requires_grad=True)  # (B, N, d)
    weight, bias = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    gamma, beta = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    params = [t.requires_grad_() for t in (weight, bias, gamma, beta)]

    def fused(y, weight, bias, gamma, beta):
        mean, var = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
        return _ProjectBatchNorm.apply(y, weight, bias, gamma, beta, mean, var, 0.1, 1e-5)

    def plain(y, weight, bias, gamma, beta):
        return F.batch_norm(weight @ y.mT + bias[:, None], None, None, gamma, beta, True, 0.1, 1e-5)

    torch.testing.assert_close(fused(y, *params), plain(y, *params))
    assert torch.autograd.gradcheck(fused, (y, *params))
    assert torch.autograd.gradgradcheck(fused, (y, *params))
    with SavedTensorCounter(exclude=[y, *params]) as counter:
        out = fused(y, *params)
    assert counter.nbytes < out.nbytes  # y and the statistics, not the (B, C, N) BN input
