"""The non-local block's fused autograd Functions: pooled φ/g in one GEMM, BN after W_z recomputed from y,
strided max-pool without indices.

Each keeps less for backward than the plain composition of torch ops would:

* ``_PoolProject``: [W_φ; W_g] · maxpool(x) + b in one GEMM, keeping x only (which the block keeps anyway),
  not the pooled map and max-pool's int64 argmax; backward pools again.
* ``_MaxPool``: ``max_pool(x, k, k)`` by strided maxima, keeping x and not the int64 argmax.
* ``_ProjectBatchNorm``: training-mode BN(W_z y + b), keeping y (kept by the attention anyway) instead of the
  block's largest activation, W_z y + b (C × N), which backward recomputes with one C × d GEMM.

Every backward is written with differentiable torch ops, so double backward (``create_graph=True``) is exact:
the pooling gradients are a scatter (linear in the incoming gradient; the argmax is piecewise constant) and the
BN gradient is torch's own ``native_batch_norm_backward``, which has a derivative. The pooling gradient is
routed without ``max_unpool`` (which has no deterministic implementation): the windows do not overlap, so each
source element receives at most one gradient, scattered to max-pool's own argmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nlnet.layers import pairwise

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


class _ProjectBatchNorm(torch.autograd.Function):
    """Training-mode BN(W y + b) that keeps y (already kept by the attention) instead of W y + b.

    The BatchNorm input is the block's largest activation (C × N); storing it costs more memory than
    recomputing it in backward costs time (one C × d GEMM). The normalisation itself is torch's own kernel,
    which also updates the running statistics. The caller checks that there is more than one value per channel
    and at least one at all (``nn.BatchNorm``'s own checks and empty-batch handling apply on its other path).
    """

    @staticmethod
    def forward(ctx, y, weight, bias, gamma, beta, running_mean, running_var, momentum, eps):
        projected = _project_for_norm(y, weight, bias)  # (B, C, N)
        out, mean, invstd = torch.native_batch_norm(
            projected, gamma, beta, running_mean, running_var, True, momentum, eps
        )
        ctx.save_for_backward(y, weight, bias, gamma, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad_out):
        y, weight, bias, gamma, mean, invstd = ctx.saved_tensors
        projected = _project_for_norm(y, weight, bias)
        grad_projected, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
            grad_out.contiguous(), projected, gamma, None, None, mean, invstd, True, ctx.eps, [True, True, True]
        )
        grad_bias = grad_projected.sum((0, 2)).to(bias.dtype)
        grad_weight = torch.bmm(grad_projected, y).sum(0).to(weight.dtype)  # (B, C, N) @ (B, N, d)
        grad_y = torch.bmm(grad_projected.mT, weight.to(y.dtype).expand(y.shape[0], -1, -1))
        return grad_y, grad_weight, grad_bias, grad_gamma, grad_beta, None, None, None, None


class _MaxPool(torch.autograd.Function):
    """``max_pool(x, kernel, kernel)`` that keeps x for backward but not the int64 argmax indices (twice the
    pooled map's bytes): backward finds the maxima again."""

    @staticmethod
    def forward(ctx, source, kernel):
        ctx.save_for_backward(source)
        ctx.kernel = kernel
        return _window_max(source, kernel)

    @staticmethod
    def backward(ctx, grad_out):
        (source,) = ctx.saved_tensors
        return _unpool_grad(source, ctx.kernel, grad_out), None


class _PoolProject(torch.autograd.Function):
    """[W_1; W_2; ...] · maxpool(x) + [b_1; b_2; ...], (B, C, *S) -> (B, Σ C_out, M), keeping only x.

    One GEMM for several 1×1 convolutions of the same pooled input (φ and g). x is the block's input, kept by
    its caller and by θ anyway; the pooled map and the int64 argmax indices that ``max_pool`` + convolutions
    would keep are recomputed in backward by pooling x again.
    """

    @staticmethod
    def forward(ctx, source, kernel, *weights_and_biases):
        weight, bias = _stack_convs(weights_and_biases)
        pooled = _window_max(source, kernel)
        ctx.save_for_backward(source, *weights_and_biases)
        ctx.kernel = kernel
        return torch.baddbmm(bias[:, None], _batched_weight(weight, source), pooled.flatten(2))

    @staticmethod
    def backward(ctx, grad_out):
        source, *weights_and_biases = ctx.saved_tensors
        kernel = ctx.kernel
        dtype = grad_out.dtype  # the forward's GEMM dtype (lower under autocast)
        with pairwise.autocast_off(source):
            # Differentiable under create_graph (max_pool's own gradient), a plain pooling otherwise.
            pooled, indices = _MAX_POOL[len(kernel)](source, kernel, kernel, return_indices=True)
            grad_weight = torch.bmm(grad_out, pooled.flatten(2).to(dtype).mT).sum(0)
            grad_bias = grad_out.sum((0, 2))
            grad_source = None
            if ctx.needs_input_grad[0]:
                weight = _stack_convs(weights_and_biases)[0].to(dtype)
                grad_pooled = torch.bmm(weight.mT.expand(source.shape[0], -1, -1), grad_out)
                grad_source = _unpool_grad(source, kernel, grad_pooled.view(pooled.shape), indices)
        sizes = [w.shape[0] for w in weights_and_biases[::2]]
        grads = []
        for grad_w, grad_b, w, b in zip(
            grad_weight.split(sizes), grad_bias.split(sizes), weights_and_biases[::2], weights_and_biases[1::2],
            strict=True,
        ):
            grads += [grad_w.reshape(w.shape).to(w.dtype), grad_b.to(b.dtype)]
        return grad_source, None, *grads


def _torch_max_pool(source: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    """``F.max_poolNd(source, kernel, kernel)``: the literal pooling of the explicit path."""
    return _MAX_POOL[len(kernel)](source, kernel, kernel)


def _window_max(source: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    """``max_pool(source, kernel, kernel)`` (windows not overlapping, remainders dropped) by strided slices,
    one axis at a time: the same numbers, NaN included, several times faster on CPU than ``max_pool3d`` for the
    block's 1×2×2 windows (whose kernel is not vectorised for small maps)."""
    out = source
    for axis in range(source.dim() - 1, 1, -1):
        k = kernel[axis - 2]
        if k > 1:
            size = out.shape[axis] // k
            windows = out.narrow(axis, 0, size * k).unflatten(axis, (size, k))
            out = windows.select(axis + 1, 0)
            for index in range(1, k):
                out = torch.maximum(out, windows.select(axis + 1, index))
    return out


def _unpool_grad(
    source: torch.Tensor, kernel: tuple[int, ...], grad_pooled: torch.Tensor, indices: torch.Tensor | None = None
) -> torch.Tensor:
    """The gradient reaching ``source`` through ``max_pool(source, kernel, kernel)``: each window's to the
    element ``max_pool``'s backward picks (its argmax ``indices``, found again when not given).

    The windows do not overlap, so every source element receives at most one gradient: a plain scatter to the
    flat argmax of each (sample, channel) plane, deterministic on every device (unlike ``max_unpool``) and
    differentiable in ``grad_pooled`` (double backward).
    """
    if indices is None:
        with torch.no_grad():
            _, indices = _MAX_POOL[len(kernel)](source, kernel, kernel, return_indices=True)
    grad_pooled = grad_pooled.to(source.dtype)
    grad_source = grad_pooled.new_zeros(*source.shape[:2], math.prod(source.shape[2:]))  # (B, C, prod(S))
    return grad_source.scatter_(2, indices.flatten(2), grad_pooled.flatten(2)).view(source.shape)


def _stack_convs(weights_and_biases) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_1, b_1, W_2, b_2, ...) of 1×1 convolutions -> the stacked (Σ C_out, C_in) weight and its bias."""
    weights, biases = weights_and_biases[::2], weights_and_biases[1::2]
    return torch.cat([w.flatten(1) for w in weights]), torch.cat(biases)


def _project_for_norm(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """W y + b in y's dtype, autocast off: (B, N, d) -> (B, C, N)."""
    with pairwise.autocast_off(y):
        return torch.baddbmm(bias.to(y.dtype)[:, None], weight.to(y.dtype).expand(y.shape[0], -1, -1), y.mT)


def _project(features: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """A 1×1 convolution as one batched GEMM: (B, C_in, *S) -> (B, C_out, prod(S)).

    Faster than the CPU's 1×1×1 ``conv3d`` and its backward, and the same numbers.
    """
    flat = features.flatten(2)  # (B, C_in, P)
    return torch.baddbmm(conv.bias[:, None], _batched_weight(conv.weight.flatten(1), flat), flat)


def _batched_weight(weight: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """A (C_out, C_in) weight as a (B, C_out, C_in) view for a batched GEMM with ``features`` (B, C_in, P).

    Under autocast the weight is cast first: autocast casting the expanded view would copy it B times.
    """
    dtype = pairwise.autocast_dtype(features)
    return (weight if dtype is None else weight.to(dtype)).expand(features.shape[0], -1, -1)
