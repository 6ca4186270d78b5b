"""Exact kernels for the pairwise part of a non-local block, y_i = 1/C(x) · Σ_j f(x_i, x̂_j) g(x̂_j).

Every peer builds the (B, N, M) affinity and keeps it for backward. The kernels here compute the same numbers
without keeping it:

* softmax modes (Gaussian, embedded Gaussian): ``scaled_dot_product_attention`` where its flash kernel applies,
  the explicit product where the affinity is small, and otherwise a query-chunked kernel that stores two
  numbers per query (the largest logit and the sum of exponentials) and recomputes each chunk's weights in
  backward;
* dot product: reassociation, θ (φᵀ g) / M, which is O(N·d²) instead of O(N·M·d) (where that is cheaper);
* concatenation: f_ij = ReLU(a_i + b_j) is non-zero exactly where b_j > -a_i, so after sorting b the sum over j
  is a suffix sum: y_i = (a_i · S_g[k_i] + S_bg[k_i]) / M with S the suffix sums of g and b·g and k_i found by
  binary search. O((N + M) log M) time, O((N + M)·d) memory, no N×M tensor at all.

All functions take batched position-major tensors (views are fine): queries (B, N, d), keys (B, M, d),
values (B, M, dv). Each differentiates twice exactly (the chunked kernel through the literal formula when its
backward builds a graph) except ``scaled_dot_product_attention``, whose backward torch cannot differentiate:
there a second backward raises, naming the way out (the block's ``impl="explicit"``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

# Above this many affinity bytes the softmax modes stop materialising the affinity (explicit product) and
# switch to the chunked kernel; below it the explicit product is the fastest exact path on CPU.
EXPLICIT_AFFINITY_BYTES = 64 * 2**20
# Query rows per chunk in the chunked kernel: the transient working set is chunk · M floats.
CHUNK_QUERIES = 2048
# The CPU flash kernel is slower than a plain GEMM for heads wider than this.
FLASH_MAX_HEAD_DIM_CPU = 512


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype the pairwise part runs in: the autocast dtype if autocast is on, float16 raised to float32.

    float16 overflows on affinities that float32 and bfloat16 represent (un-scaled Gaussian logits x_i·x_j over
    256 channels of post-ReLU features of size ~16 reach 47 000; float16 ends at 65 504), so the pairwise part
    never runs in it; bfloat16 has float32's range and stays.
    """
    dtype = tensor.dtype
    autocast = autocast_dtype(tensor)
    if autocast is not None and dtype in (torch.float32, torch.float16, torch.bfloat16):
        dtype = autocast
    return torch.float32 if dtype == torch.float16 else dtype


def autocast_dtype(tensor: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives GEMMs on ``tensor``'s device, or ``None`` where autocast is off."""
    device = tensor.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def autocast_off(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context that turns autocast off on ``tensor``'s device (a no-op where autocast does not exist: meta)."""
    device = tensor.device.type
    if torch.amp.is_autocast_available(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def softmax_weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Normalised weights softmax_j(scale · q_i·k_j): (B, N, d), (B, M, d) -> (B, N, M)."""
    return torch.softmax(torch.bmm(q, k.mT) * scale, dim=-1)


def dot_product_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Normalised weights q_i·k_j / M: (B, N, d), (B, M, d) -> (B, N, M)."""
    return torch.bmm(q, k.mT) / k.shape[1]


def concatenation_weights(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalised weights ReLU(a_i + b_j) / M: (B, N), (B, M) -> (B, N, M)."""
    return torch.relu(a[:, :, None] + b[:, None, :]) / b.shape[1]


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Σ_j softmax_j(scale · q_i·k_j) v_j without keeping the affinity when it is large.

    Args:
        q: queries (B, N, d).
        k: keys (B, M, d).
        v: values (B, M, dv).
        scale: factor applied to the dot products before the softmax.

    Returns:
        (B, N, dv).
    """
    batch, queries, head_dim = q.shape
    keys = k.shape[1]
    on_cpu = q.device.type == "cpu"
    # With no more keys than value channels (res4 of the video models: 196 keys, 512 channels) plain GEMMs
    # beat the CPU flash kernel; the chunked kernel runs on them and recomputes the small affinity in backward
    # (M·d per query) rather than keeping it.
    few_keys = on_cpu and keys <= v.shape[-1]
    wide_head = on_cpu and head_dim > FLASH_MAX_HEAD_DIM_CPU
    if head_dim == v.shape[-1] and not (few_keys or wide_head):
        # (B, 1, N, d) · (B, 1, M, d) -> (B, 1, N, d): the flash kernel keeps only q, k, v, out and the lse,
        # and runs fastest on contiguous inputs.
        q, k, v = _NoDoubleBackward.apply(*(t.contiguous().unsqueeze(1) for t in (q, k, v)))
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return out.squeeze(1)
    if not few_keys and batch * queries * keys * q.element_size() <= EXPLICIT_AFFINITY_BYTES:
        return torch.bmm(softmax_weights(q, k, scale), v)
    return _ChunkedSoftmaxAttention.apply(q, k, v, scale)


class _NoDoubleBackward(torch.autograd.Function):
    """The identity on SDPA's inputs, so that a double backward through SDPA fails with the way out.

    The backward kernels of scaled_dot_product_attention's flash and memory-efficient paths have no derivative in
    torch. Under ``create_graph=True`` this hands back the gradients of q, k and v through ``_FailsOnBackward``,
    which a second backward reaches before SDPA's backward node; a single backward with ``create_graph=True``
    (``torch.func.grad``) is left alone.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not torch.is_grad_enabled():
            return grads
        return tuple(grad if grad is None else _FailsOnBackward.apply(grad) for grad in grads)


class _FailsOnBackward(torch.autograd.Function):
    """The identity, whose backward raises: it marks gradients that cannot be differentiated again."""

    generate_vmap_rule = True

    @staticmethod
    def forward(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "double backward is not supported by NonLocalBlock's lean kernels where they run "
            "scaled_dot_product_attention (torch has no derivative for its backward kernels); build the block "
            "with impl='explicit' to differentiate it twice"
        )


class _ChunkedSoftmaxAttention(torch.autograd.Function):
    """Softmax attention over query chunks that saves q, k, v, the output and two numbers per query.

    Backward recomputes each chunk's weights (the memory-efficient attention recurrence), so memory is
    O(chunk · M) at any N. Used where the flash kernel does not apply: values narrower than the keys (Gaussian
    mode compares the raw C channels but aggregates C/2), very wide heads, or few keys.

    Per query it keeps the row maximum m_i of the logits and the sum t_i = Σ_j exp(s_ij - m_i), so that
    backward forms p_ij = exp(s_ij - m_i) / t_i from two small, well-represented numbers: the usual single
    log-sum-exp m_i + log t_i would be rounded to bfloat16's 8 bits under autocast (±0.25 at 100, ±28 % on
    every weight of an unscaled Gaussian). 1/t_i is folded into the (chunk, dv) gradient rows rather than into
    the (chunk, M) weights. Every GEMM writes row-major output, whatever the layout of q, k and v: a CPU
    bfloat16 GEMM whose output is a transposed view falls back to a reference kernel thousands of times slower.
    Gradients of k and v are summed over chunks in float32 at least.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        batch, queries, _ = q.shape
        accumulate = torch.promote_types(q.dtype, torch.float32)
        out = q.new_empty(batch, queries, v.shape[-1])
        peak = q.new_empty(batch, queries, 1)
        total = q.new_empty(batch, queries, 1, dtype=accumulate)
        for start in range(0, queries, CHUNK_QUERIES):
            rows = slice(start, start + CHUNK_QUERIES)
            logits = _scaled_logits(q[:, rows], k, scale)  # (B, n, M)
            peak[:, rows] = logits.amax(-1, keepdim=True)
            weights = _exp_(logits.sub_(peak[:, rows]))  # unnormalised, the largest is 1
            # Summed into float32 at least: a bfloat16 sum is rounded to 8 bits (±4 at 1480) before it is stored.
            total[:, rows] = weights.sum(-1, keepdim=True, dtype=accumulate)
            out[:, rows] = torch.bmm(weights, v).div_(total[:, rows])
        ctx.save_for_backward(q, k, v, out, peak, total)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, peak, total = ctx.saved_tensors
        scale = ctx.scale
        if torch.is_grad_enabled():
            # create_graph=True: the chunk recurrence below treats m_i and t_i as constants, so its own gradient
            # would be wrong; the literal formula's is exact (and keeps the N×M weights, for this graph only).
            return (*_softmax_attention_vjp(q, k, v, scale, grad_out), None)
        dtype, accumulate = q.dtype, total.dtype
        # Σ_j p_ij (dout_i · v_j) = dout_i · out_i: the softmax Jacobian's rank-one term, one number per query.
        delta = (grad_out.to(accumulate) * out).sum(-1, keepdim=True)
        # dout_i / t_i and delta_i / t_i carry the normalisation of every weight of row i.
        grad_out = (grad_out / total).to(dtype)
        delta = (delta / total).to(dtype)
        # Gradients in the layouts of q, k and v (often transposed views of channel-major projections), so that
        # they reach those tensors without a transposing copy.
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros_like(k, dtype=accumulate)
        grad_v = torch.zeros_like(v, dtype=accumulate)
        for start in range(0, q.shape[1], CHUNK_QUERIES):
            rows = slice(start, start + CHUNK_QUERIES)
            # exp(scale · q kᵀ - m) by the forward's own operations: the same weights to the last bit.
            weights = _exp_(_scaled_logits(q[:, rows], k, scale).sub_(peak[:, rows]))
            _product_into(grad_v, weights.mT, grad_out[:, rows], add=True)
            # dL/dlogits / scale: the scale goes into the two GEMMs below instead of a pass over the chunk.
            grad_logits = torch.bmm(grad_out[:, rows], v.mT).sub_(delta[:, rows]).mul_(weights)
            _product_into(grad_q[:, rows], grad_logits, k, alpha=scale)
            _product_into(grad_k, grad_logits.mT, q[:, rows], alpha=scale, add=True)
        return grad_q, grad_k.to(dtype), grad_v.to(dtype), None


def _softmax_attention_vjp(q, k, v, scale: float, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of Σ_j softmax_j(scale · q_i·k_j) v_j with respect to q, k and v, by differentiable ops."""
    weights = softmax_weights(q, k, scale)  # (B, N, M)
    grad_weights = torch.bmm(grad_out, v.mT)
    grad_logits = weights * (grad_weights - (grad_weights * weights).sum(-1, keepdim=True)) * scale
    return torch.bmm(grad_logits, k), torch.bmm(grad_logits.mT, q), torch.bmm(weights.mT, grad_out)


def _scaled_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · q kᵀ, the scale folded into the GEMM: (B, n, d), (B, M, d) -> (B, n, M)."""
    return torch.baddbmm(q.new_zeros(()), q, k.mT, beta=0, alpha=scale)


def _product_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0, add: bool = False):
    """out = alpha · a @ b (``add``: out += ...) for batched matrices, writing row-major whatever out's layout.

    A transposed ``out`` receives bᵀ aᵀ through its row-major transpose. A sum wider than the operands (float32
    over bfloat16 products, ``add`` only) receives the product formed in the operands' dtype.
    """
    if out.stride(-1) != 1:
        out, a, b = out.mT, b.mT, a.mT
    if out.dtype == a.dtype:
        out.baddbmm_(a, b, beta=1 if add else 0, alpha=alpha)
    else:
        out.add_(torch.bmm(a, b), alpha=alpha)


def _exp_(logits: torch.Tensor) -> torch.Tensor:
    """In-place exp of logits <= 0, with arguments below -87 raised to -87 first.

    exp(-87) = 1.6e-38 is float32's smallest normal number: below it the result is 0 or denormal either way,
    but the CPU's vectorised exp takes a slow path there (7× slower), which unscaled Gaussian affinities hit
    for most entries. The change to any weight is below 1.6e-38.
    """
    return logits.clamp_min_(-87.0).exp_()


def dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Σ_j (q_i·k_j) v_j / M: (B, N, d), (B, M, d), (B, M, dv) -> (B, N, dv).

    Reassociated as q (kᵀ v) / M, O((N + M)·d·dv), unless the keys are so few that the N×M product is the
    cheaper of the two (res4 of the video models: 196 keys, 512 channels); that product is then recomputed in
    backward instead of kept.
    """
    queries, keys = q.shape[1], k.shape[1]
    if queries * keys * (q.shape[-1] + v.shape[-1]) <= (queries + keys) * q.shape[-1] * v.shape[-1]:
        return _RecomputedProductAttention.apply(q, k, v)
    summary = torch.bmm(k.mT, v) / keys  # (B, d, M) @ (B, M, dv) -> (B, d, dv)
    return torch.bmm(q, summary)


class _RecomputedProductAttention(torch.autograd.Function):
    """(q kᵀ / M) v keeping q, k and v only; backward recomputes the (B, N, M) weights."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, k, v)
        return torch.bmm(dot_product_weights(q, k), v)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v = ctx.saved_tensors
        grad_v = torch.bmm(dot_product_weights(q, k).mT, grad_out)
        grad_weights = torch.bmm(grad_out, v.mT).div_(k.shape[1])
        return torch.bmm(grad_weights, k), torch.bmm(grad_weights.mT, q), grad_v


def concatenation_attention(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Σ_j ReLU(a_i + b_j) v_j / M through sorted suffix sums, exact and without an N×M tensor.

    Args:
        a: query terms w_θ·θ(x_i), (B, N).
        b: key terms w_φ·φ(x̂_j), (B, M).
        v: values g(x̂_j), (B, M, dv).

    Returns:
        (B, N, dv).
    """
    return _ConcatenationAttention.apply(a, b, v)


class _ConcatenationAttention(torch.autograd.Function):
    """The concatenation kernel with a backward of the same kind: it keeps a, b and v, nothing of size N·d.

    The pair (i, j) is active when a_i + b_j > 0. Forward sums, for each query, over the keys sorted by b; the
    gradients of b and v need, for each key, sums over the active queries, which are a suffix of the queries
    sorted by a.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        sum_v, sum_bv = _active_suffix_sums(b, a, v, with_weighted=True)
        ctx.save_for_backward(a, b, v)
        return (a[:, :, None] * sum_v + sum_bv) / b.shape[1]

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        a, b, v = ctx.saved_tensors
        keys = b.shape[1]
        (sum_v,) = _active_suffix_sums(b, a, v, with_weighted=False)
        grad_a = (grad_y * sum_v).sum(-1) / keys
        # For key j the active queries are those with a_i > -b_j: Σ dy_i and Σ a_i dy_i over them.
        sum_dy, sum_ady = _active_suffix_sums(a, b, grad_y.contiguous(), with_weighted=True)
        grad_b = (v * sum_dy).sum(-1) / keys
        grad_v = (sum_ady + b[:, :, None] * sum_dy) / keys
        return grad_a, grad_b, grad_v


def _active_suffix_sums(sorted_by: torch.Tensor, other: torch.Tensor, values: torch.Tensor, with_weighted: bool):
    """For every entry o of ``other``: Σ values_j and optionally Σ sorted_by_j·values_j over j with s_j + o > 0.

    Args:
        sorted_by: (B, M) terms s_j of the side being summed over.
        other: (B, N) terms o_i of the side asking.
        values: (B, M, D) summed vectors.

    Returns:
        One or two (B, N, D) tensors.
    """
    keys_sorted, order = torch.sort(sorted_by, dim=-1)
    values_sorted = torch.gather(values, 1, order[:, :, None].expand_as(values))
    parts = [values_sorted, keys_sorted[:, :, None] * values_sorted] if with_weighted else [values_sorted]
    stacked = torch.cat(parts, dim=-1)
    # Suffix sums with a trailing zero row: S[k] = Σ_{j >= k} in ascending order of s, S[M] = 0.
    suffix = F.pad(stacked.flip(1).cumsum(1).flip(1), (0, 0, 0, 1))
    # The first active index: the number of s_j <= -o_i.
    first_active = torch.searchsorted(keys_sorted, (-other).contiguous(), right=True)
    gathered = torch.gather(suffix, 1, first_active[:, :, None].expand(-1, -1, suffix.shape[-1]))
    return gathered.split(values.shape[-1], dim=-1)
