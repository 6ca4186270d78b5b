"""The non-local block of Wang, Girshick, Gupta and He, "Non-local Neural Networks" (CVPR 2018).

    y_i = 1/C(x) · Σ_j f(x_i, x̂_j) g(x̂_j),        z_i = BN(W_z y_i) + x_i

with the four pairwise functions f of the paper's §3.2, in 1D, 2D and 3D, x̂ = x sub-sampled by max pooling
or features from elsewhere (``memory``, e.g. a long-term feature bank). Defaults follow the released models
(the official Caffe2 ``nonlocal_helper.py``, which PySlowFast and pytorchvideo port): keys and values pooled
1×2×2 *before* φ and g (the paper's figure pools after them), the softmax scaled by d^-0.5 (``USE_SCALE``, which
the paper does not mention), biases on all four 1×1 convolutions, BN after W_z with γ = 0 so the block starts
as the identity.

What is special here is how the block is computed: no N×M affinity is kept for backward (see ``pairwise``),
projections are written straight into the position-major layout the kernels read, φ and g of the pooled input
are one GEMM that keeps neither the pooled map nor its int64 argmax (backward pools again), and in training the
BatchNorm after W_z recomputes its input from y instead of storing it wherever that is cheap (at least C/2 keys).
Those fused autograd Functions live in ``projection``, the pairwise kernels in ``pairwise``. Double backward is
exact on every path but scaled_dot_product_attention's (where it raises, naming ``impl="explicit"``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules import module as _module_globals

from nlnet.layers import pairwise
from nlnet.layers.projection import _MaxPool, _PoolProject, _project, _ProjectBatchNorm, _torch_max_pool, _window_max

MODES = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")
EXTENTS = ("spacetime", "space", "time")
IMPLS = ("auto", "explicit")
_DEFAULT_POOL = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_LAYOUT = {1: "(B, C, L)", 2: "(B, C, H, W)", 3: "(B, C, T, H, W)"}


class NonLocalBlock(nn.Module):
    """A residual non-local block: ``forward(x) = x + norm(W_z y)``.

    Args:
        in_channels: channels C of the input (and of the output).
        inner_channels: channels d of θ, φ and g; ``in_channels // 2`` by default (the paper's bottleneck).
        dim: 1, 2 or 3, for inputs (B, C, L), (B, C, H, W) or (B, C, T, H, W).
        mode: ``"gaussian"`` (raw features compared, no θ/φ), ``"embedded_gaussian"`` (self-attention, the
            paper's default), ``"dot_product"`` or ``"concatenation"``.
        pool: max-pool kernel (= stride) for the keys and values: an int, a tuple of ``dim`` ints, ``None`` for
            no sub-sampling, or ``"default"``: (1, 2, 2) in 3D (spatial only), (2, 2) in 2D, 2 in 1D.
        pool_position: ``"before"`` pools x ahead of φ and g (official Caffe2 models, PySlowFast,
            pytorchvideo); ``"after"`` pools the outputs of φ and g (the paper's figure, mmcv, AlexHex7).
            The two are different functions of the same weights. θ is never pooled.
        scale: softmax modes only: ``True`` multiplies the dot products by d^-0.5 (d = channels of the compared
            vectors) as every released model does, ``False`` leaves them, a float is used as the factor.
        norm: ``"bn"`` for a BatchNorm after W_z with γ = β = 0; ``None`` for no norm and a zero W_z (the
            official frozen-BN long-clip models). Either way the block is the identity at initialisation.
        memory_channels: channels of ``memory`` (keys and values from elsewhere); ``in_channels`` by default.
        extent: 3D only: ``"spacetime"`` (all positions), ``"space"`` (within each frame) or ``"time"`` (across
            frames at the same place), the paper's Table 2d. Pooling is applied along the axes attended over.
        temporal_groups: 3D only: attend within groups of this many consecutive frames (the official long-clip
            models use 4 at res3).
        impl: ``"auto"`` for the memory-lean exact kernels, ``"explicit"`` to build the N×M weights literally
            (plain torch ops: twice differentiable everywhere, where ``"auto"`` refuses a double backward through
            scaled_dot_product_attention).
    """

    def __init__(
        self,
        in_channels: int,
        inner_channels: int | None = None,
        *,
        dim: int = 3,
        mode: str = "embedded_gaussian",
        pool: int | tuple[int, ...] | str | None = "default",
        pool_position: str = "before",
        scale: bool | float = True,
        norm: str | None = "bn",
        memory_channels: int | None = None,
        extent: str = "spacetime",
        temporal_groups: int | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        inner_channels = in_channels // 2 if inner_channels is None else inner_channels
        memory_channels = in_channels if memory_channels is None else memory_channels
        _check_choice("dim", dim, (1, 2, 3))
        _check_choice("mode", mode, MODES)
        _check_choice("pool_position", pool_position, ("before", "after"))
        _check_choice("norm", norm, ("bn", None))
        _check_choice("extent", extent, EXTENTS)
        _check_choice("impl", impl, IMPLS)
        for name, value in (("in_channels", in_channels), ("inner_channels", inner_channels),
                            ("memory_channels", memory_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if mode == "gaussian" and memory_channels != in_channels:
            raise ValueError(
                "mode='gaussian' compares raw features, so memory_channels must equal in_channels "
                f"({in_channels}), got {memory_channels}"
            )
        if extent != "spacetime" and dim != 3:
            raise ValueError(f"extent={extent!r} needs dim=3 (a time axis), got dim={dim}")
        if temporal_groups is not None:
            if dim != 3 or extent != "spacetime":
                raise ValueError("temporal_groups needs dim=3 and extent='spacetime'")
            if not isinstance(temporal_groups, int) or temporal_groups < 1:
                raise ValueError(f"temporal_groups must be a positive int, got {temporal_groups!r}")
        if isinstance(scale, bool):
            compared = in_channels if mode == "gaussian" else inner_channels
            self.scale_factor = compared**-0.5 if scale else 1.0
        elif isinstance(scale, (int, float)) and scale > 0:
            self.scale_factor = float(scale)
        else:
            raise ValueError(f"scale must be True, False or a positive float, got {scale!r}")

        self.in_channels = in_channels
        self.inner_channels = inner_channels
        self.memory_channels = memory_channels
        self.dim = dim
        self.mode = mode
        self.pool_position = pool_position
        self.extent = extent
        self.temporal_groups = temporal_groups
        self.impl = impl
        self.pool_kernel = _resolve_pool(pool, dim, extent)

        conv = _CONV[dim]
        if mode != "gaussian":
            self.theta = conv(in_channels, inner_channels, kernel_size=1)
            self.phi = conv(memory_channels, inner_channels, kernel_size=1)
        self.g = conv(memory_channels, inner_channels, kernel_size=1)
        self.out = conv(inner_channels, in_channels, kernel_size=1)
        self.norm = _BATCH_NORM[dim](in_channels) if norm == "bn" else None
        if mode == "concatenation":
            # f_ij = ReLU(w[:d]·θ_i + w[d:]·φ_j): the paper's w_f applied to [θ_i, φ_j].
            self.concat = nn.Linear(2 * inner_channels, 1, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MSRA (fan_out) convolutions with zero biases, as the paper and PySlowFast; identity at init."""
        for conv in (getattr(self, "theta", None), getattr(self, "phi", None), self.g, self.out):
            if conv is not None:
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)
        if self.mode == "concatenation":
            nn.init.kaiming_normal_(self.concat.weight, nonlinearity="relu")
        if self.norm is not None:
            self.norm.reset_parameters()
            nn.init.zeros_(self.norm.weight)
            nn.init.zeros_(self.norm.bias)
        else:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.inner_channels}, dim={self.dim}, mode={self.mode!r}, "
            f"pool={self.pool_kernel}, pool_position={self.pool_position!r}, scale={self.scale_factor:.4g}, "
            f"extent={self.extent!r}, temporal_groups={self.temporal_groups}, impl={self.impl!r}"
        )

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the block.

        Args:
            x: (B, C, *S) with S = (L,), (H, W) or (T, H, W).
            memory: optional (B, memory_channels, *S') supplying the keys and values instead of x.

        Returns:
            A tensor shaped like x.
        """
        source = self._check_inputs(x, memory)
        queries, keys, values = self._embed(x, source)
        embed_dtype, dtype = values.dtype, pairwise.compute_dtype(values)
        with pairwise.autocast_off(x):
            queries, keys, values = queries.to(dtype), keys.to(dtype), values.to(dtype)
            if self.impl == "explicit":
                y = torch.bmm(self._weights(queries, keys), values)
            elif self.mode == "dot_product":
                y = pairwise.dot_product_attention(queries, keys, values)
            elif self.mode == "concatenation":
                y = pairwise.concatenation_attention(queries, keys, values)
            else:
                y = pairwise.softmax_attention(queries, keys, values, self.scale_factor)
        if pairwise.autocast_dtype(x) is None:
            # A float16 module's pairwise part ran in float32: W_z, BN and the output are in the module's dtype.
            # (Under float16 autocast y stays float32, as autocast would keep a float32 op's output.)
            y = y.to(embed_dtype)
        y = self._ungroup(y, x.shape[2:])  # (B, N, d)
        # Recomputing W_z y in backward costs one C·d multiply-add per query; with at least C/2 keys the pairwise
        # part costs more (M·d, twice), so the memory is bought cheaply. With fewer keys (res4: 196 keys, 1024
        # channels) the recompute would be one of the block's largest costs, and W_z y is kept instead, except
        # in concatenation mode, which is chosen for memory (its pairwise part keeps no N×M tensor at all).
        few_keys = 2 * keys.shape[1] < self.in_channels
        return x + self._project_out(y, x.shape, recompute=self.mode == "concatenation" or not few_keys)

    def attention(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """The normalised pairwise weights f(x_i, x̂_j) / C(x), computed literally.

        Args:
            x: (B, C, *S) as in ``forward``.
            memory: optional keys/values source as in ``forward``.

        Returns:
            (B, N, M) with N = prod(S) query positions and M key positions (after pooling), both flattened
            in row-major order over their (T, H, W) grids. With ``extent`` or ``temporal_groups`` a query only
            sees part of the keys; the weights of the others are 0.
        """
        source = self._check_inputs(x, memory)
        queries, keys, _ = self._embed(x, source)
        dtype = torch.promote_types(queries.dtype, torch.float32)  # float64 stays float64
        weights = self._weights(queries.to(dtype), keys.to(dtype))  # (B·G, n, m)
        query_shape = x.shape[2:]
        key_shape = self._key_shape(source.shape[2:])
        if self.extent == "spacetime" and self.temporal_groups is None:
            return weights
        # Scatter each group's block into the full (B, N, M) matrix through the grouping of position indices.
        groups = self._time_groups(query_shape)
        query_index = self._group(_position_index(query_shape, x.device), query_shape, groups)[..., 0]  # (G, n)
        key_index = self._group(_position_index(key_shape, x.device), key_shape, groups)[..., 0]  # (G, m)
        batch = x.shape[0]
        full = weights.new_zeros(batch, math.prod(query_shape), math.prod(key_shape))
        blocks = weights.view(batch, query_index.shape[0], *weights.shape[1:])
        full[:, query_index[:, :, None], key_index[:, None, :]] = blocks
        return full

    # -- the pieces -------------------------------------------------------------------------------------------

    def _check_inputs(self, x: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        expected = _LAYOUT[self.dim]
        if x.dim() != self.dim + 2:
            raise ValueError(
                f"NonLocalBlock(dim={self.dim}) expects x of shape {expected}, got {x.dim()}-D {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected x with {self.in_channels} channels, got {x.shape[1]} ({tuple(x.shape)})")
        source = x if memory is None else memory
        if memory is not None:
            self._check_memory(x, memory)
        if self.pool_kernel and any(size < k for size, k in zip(source.shape[2:], self.pool_kernel, strict=True)):
            raise ValueError(
                f"pooling kernel {self.pool_kernel} is larger than the key grid {tuple(source.shape[2:])}; "
                "use a smaller pool or pool=None"
            )
        return source

    def _check_memory(self, x: torch.Tensor, memory: torch.Tensor) -> None:
        expected = _LAYOUT[self.dim]
        if memory.dim() != self.dim + 2:
            raise ValueError(
                f"memory must be {self.dim + 2}-D {expected} like x, got {memory.dim()}-D {tuple(memory.shape)}"
            )
        if memory.shape[0] != x.shape[0]:
            raise ValueError(f"memory batch {memory.shape[0]} does not match x batch {x.shape[0]}")
        if memory.shape[1] != self.memory_channels:
            raise ValueError(
                f"expected memory with memory_channels={self.memory_channels} channels, got {memory.shape[1]}"
            )

    def _key_shape(self, source_shape: torch.Size) -> tuple[int, ...]:
        if self.pool_kernel is None:
            return tuple(source_shape)
        return tuple(size // k for size, k in zip(source_shape, self.pool_kernel, strict=True))

    def _embed(self, x: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Grouped queries, keys and values as position-major views: (B·G, n, ·), (B·G, m, ·), (B·G, m, d).

        Projections are computed channel-major, as a convolution would: the kernels read them through
        transposed views, and the gradients reaching x come back in x's own layout, with no transposition.
        In concatenation mode queries and keys are the scalar terms a_i = w_θ·θ_i and b_j = w_φ·φ_j, (B·G, n)
        and (B·G, m).
        """
        kernel = self.pool_kernel
        lean = self.impl == "auto" and torch.is_grad_enabled()
        if self.impl == "explicit":
            max_pool = _torch_max_pool
        else:
            max_pool = _MaxPool.apply if lean else _window_max
        pool_first = kernel is None or self.pool_position == "before"
        gaussian = self.mode == "gaussian"
        if lean and kernel is not None and pool_first and not gaussian:
            # φ and g of the pooled source in one GEMM that keeps the source, not the pooled map and its
            # int64 argmax (backward pools again): (B, 2d, M) -> two (B, d, M) views.
            projected = _PoolProject.apply(source, kernel, self.phi.weight, self.phi.bias, self.g.weight, self.g.bias)
            phi, values = projected.split(self.inner_channels, 1)
        else:
            needs_pooled = kernel is not None and (pool_first or gaussian)
            pooled = max_pool(source, kernel) if needs_pooled else source

            def embed_keys(conv: nn.Conv1d) -> torch.Tensor:  # (B, d, M)
                if pool_first:
                    return _project(pooled, conv)
                return max_pool(_project(source, conv).unflatten(2, source.shape[2:]), kernel).flatten(2)

            values = embed_keys(self.g)
            phi = None if gaussian else embed_keys(self.phi)
        if gaussian:
            queries, keys = x.flatten(2), pooled.flatten(2)
        elif self.mode == "concatenation":
            weight_theta, weight_phi = self.concat.weight[0].split(self.inner_channels)
            # a_i = w_θ·(W_θ x_i + b_θ) = (W_θᵀ w_θ)·x_i + w_θ·b_θ: θ itself is never materialised.
            # Batched GEMMs with row vectors expanded over the batch: matmul folds (C,) @ (B, C, N) into one GEMM
            # over a transposed copy of x, which it keeps for backward (as many bytes as x).
            folded = weight_theta @ self.theta.weight.flatten(1)  # (C,)
            flat = x.flatten(2)
            queries = torch.bmm(folded.expand(flat.shape[0], 1, -1), flat) + weight_theta @ self.theta.bias
            keys = torch.bmm(weight_phi.expand(phi.shape[0], 1, -1), phi)  # (B, 1, d) @ (B, d, M) -> (B, 1, M)
        else:
            queries, keys = _project(x, self.theta), phi
        key_shape = self._key_shape(source.shape[2:])
        groups = self._time_groups(x.shape[2:])
        queries = self._group(queries.mT, x.shape[2:], groups)
        keys = self._group(keys.mT, key_shape, groups)
        values = self._group(values.mT, key_shape, groups)
        if self.mode == "concatenation":
            queries, keys = queries[..., 0], keys[..., 0]
        return queries, keys, values

    def _time_groups(self, query_shape: tuple[int, ...]) -> int:
        """How many groups of consecutive frames attend separately (1 for spacetime, T for space)."""
        if self.dim != 3 or self.extent == "time":
            return 1
        time = query_shape[0]
        if self.extent == "space":
            return time
        if self.temporal_groups is None:
            return 1
        if time % self.temporal_groups:
            raise ValueError(
                f"temporal_groups={self.temporal_groups} needs a time size divisible into groups, got T={time}"
            )
        return time // self.temporal_groups

    def _group(self, positions: torch.Tensor, shape: tuple[int, ...], groups: int) -> torch.Tensor:
        """(B, P, D) over the grid ``shape`` -> (B·G, P/G, D), one row block per group of attending positions."""
        if self.extent == "time":
            batch, _, channels = positions.shape
            time, height, width = shape
            grid = positions.view(batch, time, height * width, channels)
            return grid.transpose(1, 2).reshape(batch * height * width, time, channels)
        if groups == 1:
            return positions
        if shape[0] % groups:
            raise ValueError(f"keys with T={shape[0]} frames cannot be split into the queries' {groups} groups")
        return positions.reshape(positions.shape[0] * groups, -1, positions.shape[-1])

    def _ungroup(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of ``_group`` for the queries: (B·G, n, d) -> (B, N, d)."""
        if self.dim != 3 or (self.extent == "spacetime" and self.temporal_groups is None):
            return y
        time, height, width = shape
        batch = y.shape[0] * y.shape[1] // math.prod(shape)
        if self.extent == "time":
            grid = y.view(batch, height * width, time, y.shape[-1])
            return grid.transpose(1, 2).reshape(batch, -1, y.shape[-1])
        return y.reshape(batch, -1, y.shape[-1])

    def _weights(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        if self.mode == "dot_product":
            return pairwise.dot_product_weights(queries, keys)
        if self.mode == "concatenation":
            return pairwise.concatenation_weights(queries, keys)
        return pairwise.softmax_weights(queries, keys, self.scale_factor)

    def _project_out(self, y: torch.Tensor, shape: torch.Size, recompute: bool = False) -> torch.Tensor:
        """norm(W_z y): (B, N, d) -> (B, C, *S); ``recompute``: training BN keeps y, not W_z y."""
        batch = y.shape[0]
        weight = self.out.weight.flatten(1)
        norm = self.norm
        # The fused kernel only pays where backward will run (under no_grad, as in precise BN and evaluation,
        # there is nothing to save), and it is all the module would do only where calling the module runs nothing
        # else: no hooks (precise BN's pre-hooks read the BN input), no forward replaced on the instance. With one
        # value per channel or none the module runs too: nn.BatchNorm raises (one) or passes the empty batch (none).
        fused = (
            recompute and self.impl == "auto" and torch.is_grad_enabled() and batch * y.shape[1] > 1
            and norm is not None and norm.training and norm.track_running_stats
            and type(norm) is _BATCH_NORM[self.dim] and not _calls_more_than_forward(norm)
        )
        if fused:
            norm.num_batches_tracked.add_(1)
            # momentum=None means a cumulative average, as in nn.BatchNorm.
            factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
            out = _ProjectBatchNorm.apply(
                y, weight, self.out.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var, factor, norm.eps
            )
            return out.view(shape)
        with pairwise.autocast_off(y):
            projected = torch.baddbmm(
                self.out.bias.to(y.dtype)[:, None], weight.to(y.dtype).expand(batch, -1, -1), y.mT
            )  # (B, C, d) @ (B, d, N) -> (B, C, N)
        projected = projected.view(shape)
        return projected if norm is None else norm(projected)


def _calls_more_than_forward(module: nn.Module) -> bool:
    """Whether ``module(...)`` runs anything besides its class's ``forward``: hooks of its own or global ones
    (forward, forward-pre, backward), or a ``forward`` replaced on the instance."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return (
        "forward" in vars(module)
        or any(getattr(module, name, None) for name in hooks)
        or any(getattr(_module_globals, f"_global{name}", None) for name in hooks)
    )


def _position_index(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Flat position numbers laid out like projected features: (1, prod(shape), 1)."""
    return torch.arange(math.prod(shape), device=device).view(1, -1, 1)


def _resolve_pool(pool, dim: int, extent: str) -> tuple[int, ...] | None:
    if pool is None:
        return None
    if isinstance(pool, str):
        if pool != "default":
            raise ValueError(f"pool must be 'default', None, an int or a tuple of {dim} ints, got {pool!r}")
        kernel = _DEFAULT_POOL[dim]
    elif isinstance(pool, int):
        kernel = (pool,) * dim
    else:
        kernel = tuple(pool)
    if len(kernel) != dim or not all(isinstance(k, int) and k >= 1 for k in kernel):
        raise ValueError(f"pool must have {dim} positive ints for dim={dim}, got {pool!r}")
    # Only the attended axes are pooled: keys at other times (space) or other places (time) are not seen.
    if extent == "space":
        kernel = (1,) + kernel[1:]
    elif extent == "time":
        kernel = kernel[:1] + (1, 1)
    return None if all(k == 1 for k in kernel) else kernel


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
