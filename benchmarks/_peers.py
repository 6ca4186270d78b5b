"""The implementations nlnet's NonLocalBlock is benchmarked against, each loaded with the block's own weights.

* ``explicit``: a literal reference written here — 1×1 convs, max-pool, the (B, N, M) affinity by ``bmm``,
  softmax (or ÷M), ``bmm`` with g, output conv, BN, residual; what every peer does, in nlnet's configuration.
  Concatenation forms its (B, N, M) weights as ReLU(w_θ·θ_i + w_φ·φ_j) — the same numbers as w_fᵀ[θ_i, φ_j];
  the literal (B, 2C', N, M) concatenation is mmcv's form and is benchmarked in the mmcv row.
* ``pytorchvideo``: ``create_nonlocal`` (3-D only; softmax and dot product; pools x before φ and g).
* ``mmcv``: ``NonLocal1d/2d/3d`` from mmcv-lite (all four modes; pools after the φ and g convs; its output
  conv drops the bias when a norm follows; Gaussian mode never scaled).
* ``timm``: ``NonLocalAttn`` (2-D embedded Gaussian only; inner channels C/8, no sub-sampling, scale 1/√C).

A peer's semantics are matched by configuring nlnet (``nlnet_config``), never by patching the peer; where a
peer cannot express a mode or dimensionality, ``nlnet_config`` raises :class:`Unsupported` with the reason.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from nlnet import NonLocalBlock

PEERS = ("pytorchvideo", "mmcv", "timm")
MODES = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")

# Keyword arguments of NonLocalBlock for the reference rows (nlnet and explicit): the official Caffe2
# configuration (pool x before φ and g, softmax scaled by 1/√C').
DEFAULT_CONFIG: dict = {"pool": "default", "pool_position": "before", "scale": True, "norm": "bn"}


class Unsupported(Exception):
    """A peer cannot express this mode / dimensionality / configuration."""


def nlnet_config(impl: str, mode: str, dim: int, in_channels: int) -> dict:
    """NonLocalBlock keyword arguments under which nlnet computes the same function as ``impl``.

    Args:
        impl: "nlnet", "explicit" or one of :data:`PEERS`.
        mode: one of :data:`MODES`.
        dim: 1, 2 or 3.
        in_channels: channels C of the input.

    Returns:
        Keyword arguments for ``NonLocalBlock(in_channels, dim=dim, mode=mode, **kwargs)``.

    Raises:
        Unsupported: the peer cannot express this mode or dimensionality.
    """
    config = dict(DEFAULT_CONFIG, inner_channels=in_channels // 2)
    if impl in ("nlnet", "explicit"):
        return config
    if impl == "pytorchvideo":
        if dim != 3:
            raise Unsupported("pytorchvideo's NonLocal is 3-D only")
        if mode not in ("embedded_gaussian", "dot_product"):
            raise Unsupported("pytorchvideo has softmax and dot_product only")
        return config
    if impl == "mmcv":
        # mmcv scales the embedded Gaussian by 1/√C' (use_scale=True) and never the Gaussian.
        return dict(config, pool_position="after", scale=mode != "gaussian")
    if impl == "timm":
        if dim != 2:
            raise Unsupported("timm's NonLocalAttn is 2-D only")
        if mode != "embedded_gaussian":
            raise Unsupported("timm's NonLocalAttn is embedded Gaussian only")
        return dict(config, inner_channels=_timm_inner_channels(in_channels), pool=None,
                    scale=in_channels**-0.5)
    raise ValueError(f"unknown implementation {impl!r}; expected nlnet, explicit or one of {PEERS}")


def _timm_inner_channels(in_channels: int) -> int:
    from timm.layers.helpers import make_divisible

    return make_divisible(in_channels / 8, divisor=8)


def randomize_(block: NonLocalBlock, seed: int = 0) -> NonLocalBlock:
    """Give every weight of the block a random, unit-gain value so the output depends on the attention.

    Conv weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1²) except the output conv's (zero, because mmcv drops that
    bias when a norm follows), BN γ = 1 and β ~ N(0, 0.1²), the concatenation projection ~ N(0, 1/(2C')).
    At init the block is the identity (γ = 0), which would make every comparison trivially exact.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / math.sqrt(fan_in))
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.fill_(1.0)
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
        block.out.bias.zero_()
    return block


def _resolved_scale(mode: str, scale: bool | float, key_channels: int) -> float:
    """The factor applied to the logits of the softmax modes: True → 1/√(key channels), False → 1."""
    if scale is True:
        return key_channels**-0.5
    if scale is False:
        return 1.0
    return float(scale)


class ExplicitNonLocal(nn.Module):
    """The literal N×M non-local block, holding copies of an nlnet block's weights.

    Args:
        block: the nlnet block whose submodules are copied.
        mode: its mode.
        dim: its dimensionality.
        pool: its pool kernel (``block.pool_kernel``), or None.
        pool_position: "before" (pool x, then φ and g) or "after" (φ and g, then pool).
        scale: its ``scale`` argument (softmax modes).
    """

    def __init__(self, block: NonLocalBlock, *, mode: str, dim: int, pool: tuple[int, ...] | None,
                 pool_position: str, scale: bool | float) -> None:
        super().__init__()
        self.mode, self.dim, self.pool, self.pool_position = mode, dim, pool, pool_position
        self.g = copy.deepcopy(block.g)
        self.out = copy.deepcopy(block.out)
        self.norm = copy.deepcopy(block.norm)
        if mode != "gaussian":
            self.theta = copy.deepcopy(block.theta)
            self.phi = copy.deepcopy(block.phi)
        if mode == "concatenation":
            self.concat = copy.deepcopy(block.concat)
        key_channels = block.g.in_channels if mode == "gaussian" else block.theta.out_channels
        self.scale = _resolved_scale(mode, scale, key_channels)

    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        if self.pool is None:
            return t
        return getattr(F, f"max_pool{self.dim}d")(t, self.pool, self.pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, C, *S)."""
        batch, spatial = x.shape[0], x.shape[2:]
        if self.mode == "gaussian":
            theta, phi = x, self._pool(x)
            g = self.g(self._pool(x)) if self.pool_position == "before" else self._pool(self.g(x))
        elif self.pool_position == "before":
            pooled = self._pool(x)
            theta, phi, g = self.theta(x), self.phi(pooled), self.g(pooled)
        else:
            theta, phi, g = self.theta(x), self._pool(self.phi(x)), self._pool(self.g(x))
        theta = theta.flatten(2).transpose(1, 2)  # (B, N, d)
        phi = phi.flatten(2)  # (B, d, M)
        g = g.flatten(2).transpose(1, 2)  # (B, M, C')
        keys = phi.shape[-1]
        if self.mode in ("gaussian", "embedded_gaussian"):
            weights = torch.softmax(torch.bmm(theta, phi) * self.scale, dim=-1)  # (B, N, M)
        elif self.mode == "dot_product":
            weights = torch.bmm(theta, phi) / keys
        else:
            w_theta, w_phi = self.concat.weight[0].chunk(2)
            a = theta @ w_theta  # (B, N)
            b = w_phi @ phi  # (B, M)
            weights = torch.relu(a[:, :, None] + b[:, None, :]) / keys
        y = torch.bmm(weights, g).transpose(1, 2).reshape(batch, -1, *spatial)  # (B, C', *S)
        return x + self.norm(self.out(y))


def build(impl: str, block: NonLocalBlock, *, mode: str, dim: int, config: dict) -> nn.Module:
    """A module computing ``block``'s function the way ``impl`` does, with ``block``'s weights.

    Args:
        impl: "explicit" or one of :data:`PEERS`.
        block: a (randomized) nlnet block built with ``nlnet_config(impl, mode, dim, C)``.
        mode: the block's mode.
        dim: the block's dimensionality.
        config: the keyword arguments the block was built with.

    Returns:
        The module, in the block's train/eval mode.
    """
    if impl == "explicit":
        module = ExplicitNonLocal(block, mode=mode, dim=dim, pool=block.pool_kernel,
                                  pool_position=config["pool_position"], scale=config["scale"])
    elif impl == "pytorchvideo":
        module = _pytorchvideo_from(block, mode)
    elif impl == "mmcv":
        module = _mmcv_from(block, mode, dim, config)
    elif impl == "timm":
        module = _timm_from(block)
    else:
        raise ValueError(f"unknown implementation {impl!r}; expected explicit or one of {PEERS}")
    return module.train(block.training)


def _pytorchvideo_from(block: NonLocalBlock, mode: str) -> nn.Module:
    from pytorchvideo.layers.nonlocal_net import create_nonlocal

    peer = create_nonlocal(
        dim_in=block.theta.in_channels,
        dim_inner=block.theta.out_channels,
        pool_size=block.pool_kernel or (1, 1, 1),
        instantiation="softmax" if mode == "embedded_gaussian" else "dot_product",
        norm=nn.BatchNorm3d,
        norm_eps=block.norm.eps,
        norm_momentum=block.norm.momentum,
    )
    for theirs, ours in (("conv_theta", "theta"), ("conv_phi", "phi"), ("conv_g", "g"), ("conv_out", "out"),
                         ("norm", "norm")):
        getattr(peer, theirs).load_state_dict(getattr(block, ours).state_dict())
    return peer


def _mmcv_from(block: NonLocalBlock, mode: str, dim: int, config: dict) -> nn.Module:
    from mmcv.cnn import NonLocal1d, NonLocal2d, NonLocal3d

    in_channels, inner = block.g.in_channels, block.g.out_channels
    mmcv_kernel = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}[dim]
    if block.pool_kernel not in (None, mmcv_kernel):
        raise Unsupported(f"mmcv sub-samples with a fixed {mmcv_kernel} kernel, not {block.pool_kernel}")
    peer_class = {1: NonLocal1d, 2: NonLocal2d, 3: NonLocal3d}[dim]
    peer = peer_class(in_channels, sub_sample=block.pool_kernel is not None, reduction=in_channels // inner,
                      use_scale=bool(config["scale"]), norm_cfg={"type": f"BN{dim}d"}, mode=mode)
    if peer.inter_channels != inner:
        raise Unsupported(f"mmcv cannot express {inner} inner channels for {in_channels} input channels")

    def conv_of(module: nn.Module) -> nn.Module:
        return (module[0] if isinstance(module, nn.Sequential) else module).conv

    conv_of(peer.g).load_state_dict(block.g.state_dict())
    if mode != "gaussian":
        conv_of(peer.theta).load_state_dict(block.theta.state_dict())
        conv_of(peer.phi).load_state_dict(block.phi.state_dict())
    if mode == "concatenation":
        weight = block.concat.weight.detach()  # (1, 2C'), [θ half, φ half]
        peer.concat_project.conv.weight.data.copy_(weight.reshape(peer.concat_project.conv.weight.shape))
    if torch.any(block.out.bias != 0):
        raise Unsupported("mmcv's output conv has no bias when a norm follows; zero the block's out.bias")
    peer.conv_out.conv.weight.data.copy_(block.out.weight.detach())
    peer.conv_out.norm.load_state_dict(block.norm.state_dict())
    return peer


def _timm_from(block: NonLocalBlock) -> nn.Module:
    from timm.layers import NonLocalAttn

    peer = NonLocalAttn(block.theta.in_channels, use_scale=True, rd_channels=block.theta.out_channels)
    for theirs, ours in (("t", "theta"), ("p", "phi"), ("g", "g"), ("z", "out"), ("norm", "norm")):
        getattr(peer, theirs).load_state_dict(getattr(block, ours).state_dict())
    return peer
