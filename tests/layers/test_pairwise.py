"""The pairwise kernels (``nlnet.layers.pairwise``) against the formulas they compute: values, gradients, double
backward, bfloat16 accuracy and every dispatch path."""

from __future__ import annotations

import pytest
import torch

from nlnet.layers import pairwise

SDPA_DOUBLE_BACKWARD = "double backward is not supported by NonLocalBlock's lean kernels.*impl='explicit'"


def test_gradcheck_recomputed_product_kernel():
    q = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pairwise._RecomputedProductAttention.apply, (q, k, v))
    torch.testing.assert_close(pairwise._RecomputedProductAttention.apply(q, k, v), q @ k.mT @ v / 3)


def test_gradcheck_chunked_softmax_kernel(monkeypatch):
    monkeypatch.setattr(pairwise, "CHUNK_QUERIES", 3)
    q = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: pairwise._ChunkedSoftmaxAttention.apply(q, k, v, 0.7), (q, k, v))
    expected = torch.softmax(q @ k.mT * 0.7, -1) @ v
    torch.testing.assert_close(pairwise._ChunkedSoftmaxAttention.apply(q, k, v, 0.7), expected)


@pytest.mark.parametrize("scale", (1.0, 0.125))
def test_chunked_softmax_in_bfloat16_is_as_accurate_as_the_explicit_product(monkeypatch, scale):
    # Backward must rebuild the forward's weights from numbers bfloat16 holds well: a single rounded log-sum-exp
    # (±0.25 at 100) or a recompute rounded differently from the forward moved every weight by up to 28 %.
    monkeypatch.setattr(pairwise, "CHUNK_QUERIES", 64)
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, n, 64, generator=generator, dtype=torch.float64) * 2 for n in (300, 200))
    v, grad = torch.randn(1, 200, 32, generator=generator, dtype=torch.float64), torch.randn(1, 300, 32)

    def output_and_grads(function, dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = function(*inputs)
        out.backward(grad.to(dtype))
        return [out.double()] + [t.grad.double() for t in inputs]

    def explicit(q, k, v):
        return torch.softmax(q @ k.mT * scale, -1) @ v

    reference = output_and_grads(explicit, torch.float64)
    chunked = output_and_grads(lambda q, k, v: pairwise._ChunkedSoftmaxAttention.apply(q, k, v, scale),
                               torch.bfloat16)
    plain = output_and_grads(explicit, torch.bfloat16)
    for ours, theirs, exact in zip(chunked, plain, reference, strict=True):
        error, baseline = ((t - exact).norm() / exact.norm() for t in (ours, theirs))
        assert error <= 1.25 * baseline + 1e-3, (error, baseline)


def test_softmax_dispatch_agrees_on_every_path(monkeypatch):
    torch.manual_seed(0)
    q, k = torch.randn(2, 40, 8), torch.randn(2, 12, 8)
    for v in (torch.randn(2, 12, 8), torch.randn(2, 12, 4)):  # SDPA (equal widths), explicit (narrow values)
        expected = torch.softmax(q @ k.mT * 0.5, -1) @ v
        torch.testing.assert_close(pairwise.softmax_attention(q, k, v, 0.5), expected)
    monkeypatch.setattr(pairwise, "EXPLICIT_AFFINITY_BYTES", 0)
    torch.testing.assert_close(pairwise.softmax_attention(q, k, v, 0.5), expected)  # chunked


@pytest.mark.parametrize("keys", (2, 12))  # few keys: the N×M product; many: reassociation
def test_dot_product_kernel_on_both_paths(keys):
    q, k = torch.randn(2, 40, 8, dtype=torch.float64), torch.randn(2, keys, 8, dtype=torch.float64)
    v = torch.randn(2, keys, 8, dtype=torch.float64)
    torch.testing.assert_close(pairwise.dot_product_attention(q, k, v), (q @ k.mT / keys) @ v)


def test_chunked_softmax_normaliser_is_summed_in_float32_under_bfloat16(monkeypatch):
    # The row sum t_i of ~1500 bfloat16 weights rounded to bfloat16 (8 bits) is off by up to 4; it is stored in
    # float32 and must be the float32 sum of exactly the weights the forward formed.
    monkeypatch.setattr(pairwise, "CHUNK_QUERIES", 16)
    generator = torch.Generator().manual_seed(0)
    q = (torch.randn(2, 40, 16, generator=generator) * 0.3).bfloat16().requires_grad_()
    k = (torch.randn(2, 2000, 16, generator=generator) * 0.3).bfloat16().requires_grad_()
    v = torch.randn(2, 2000, 8, generator=generator).bfloat16().requires_grad_()
    out = pairwise._ChunkedSoftmaxAttention.apply(q, k, v, 0.25)
    *_, peak, total = out.grad_fn.saved_tensors
    assert total.dtype == torch.float32
    with torch.no_grad():
        weights = pairwise._exp_(pairwise._scaled_logits(q, k, 0.25).sub_(peak))  # the forward's own operations
        exact = weights.double().sum(-1, keepdim=True)
    assert exact.min() > 1000
    torch.testing.assert_close(total.double(), exact, rtol=1e-6, atol=0)


def test_chunked_softmax_kernel_differentiates_twice(monkeypatch):
    monkeypatch.setattr(pairwise, "CHUNK_QUERIES", 3)
    q = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    chunked = lambda q, k, v: pairwise._ChunkedSoftmaxAttention.apply(q, k, v, 0.7)  # noqa: E731
    assert torch.autograd.gradgradcheck(chunked, (q, k, v))


def test_product_and_concatenation_kernels_differentiate_twice():
    q = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(pairwise._RecomputedProductAttention.apply, (q, k, v))
    a = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(pairwise._ConcatenationAttention.apply, (a, b, v))


def test_sdpa_path_refuses_double_backward_but_not_a_single_one_with_a_graph():
    q, k, v = (torch.randn(2, n, 4, dtype=torch.float64, requires_grad=True) for n in (6, 5, 5))  # M > dv: SDPA

    def sdpa(q, k, v):
        return pairwise.softmax_attention(q, k, v, 0.5)

    expected = torch.softmax(q @ k.mT * 0.5, -1) @ v
    torch.testing.assert_close(sdpa(q, k, v), expected)
    assert torch.autograd.gradcheck(sdpa, (q, k, v), fast_mode=True)
    # One backward that builds a graph (torch.func.grad does) is fine; differentiating its result again is not.
    grads = torch.autograd.grad(sdpa(q, k, v).square().sum(), (q, k, v), create_graph=True)
    torch.testing.assert_close(grads, torch.autograd.grad(expected.square().sum(), (q, k, v)))
    with pytest.raises(RuntimeError, match=SDPA_DOUBLE_BACKWARD):
        torch.autograd.gradgradcheck(sdpa, (q, k, v))
