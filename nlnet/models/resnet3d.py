"""C2D and I3D ResNets for video with non-local blocks, built as the official Caffe2 code builds them.

Wang et al., "Non-local Neural Networks", CVPR 2018, Table 1 and §4; the details follow the released code
(`video-nonlocal-net`, `resnet_video_org.py` / `resnet_video.py` / `resnet_helper.py`) where it differs from
the paper's text:

- stem: conv1 kT x 7 x 7 (spatial stride 2, temporal stride 2 for 32x2 clips, 1 for 8x8), BN, ReLU, then
  max-pool 2x3x3 stride 2 (32x2) or 1x3x3 stride (1, 2, 2) (8x8) with no padding, so 224 -> 55 in res2;
- pool2: max-pool 2x1x1 stride (2, 1, 1) between res2 and res3;
- bottleneck: kT x 1 x 1 -> 1 x 3 x 3 (carries the spatial stride) -> 1 x 1 x 1, BN after each, shortcut
  1 x 1 x 1 conv + BN on the first block of each stage; the last BN of each block starts at γ = 0;
- a non-local block sits after the final ReLU of the residual block it follows;
- head: average pool [T_res5, 7, 7] with stride 1, dropout, fc N(0, 0.01); at test time the fc can act as a
  1 x 1 x 1 convolution over the pooled map (fully-convolutional testing on 256 x 256 crops).

Module names follow the paper (stem, res2..res5, head) and, inside a bottleneck, torchvision's ResNet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nlnet.layers import NonLocalBlock
from nlnet.models.presets import STAGES, Clip

# Caffe2's BN epsilon; PyTorch momentum 0.1 is Caffe2's 0.9.
BN_EPS = 1e-5
# The fixed spatial size of the head's average pool: the res5 map of a 224 x 224 input.
HEAD_POOL_SPATIAL = 7


def _msra_fill(conv: nn.Conv3d) -> None:
    # Caffe2 MSRAFill: normal with std sqrt(2 / fan_out); no biases in the backbone.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")


class Stem(nn.Module):
    """conv1 + BN + ReLU + pool1.

    Args:
        in_channels: input channels (3 for RGB).
        width: output channels of conv1 (64 in the paper).
        temporal_kernel: kT of conv1 (1 for C2D, 5 for I3D); temporal padding kT // 2.
        clip: the clip format's temporal stride and pool1 kernel.

    Shapes: (B, 3, T, H, W) -> (B, width, T / s, ~H / 4, ~W / 4), s = 4 for 32x2 clips, 1 for 8x8.
    """

    def __init__(self, in_channels: int, width: int, temporal_kernel: int, clip: Clip) -> None:
        super().__init__()
        self.conv = nn.Conv3d(
            in_channels,
            width,
            kernel_size=(temporal_kernel, 7, 7),
            stride=(clip.stem_stride, 2, 2),
            padding=(temporal_kernel // 2, 3, 3),
            bias=False,
        )
        self.bn = nn.BatchNorm3d(width, eps=BN_EPS)
        self.relu = nn.ReLU(inplace=True)
        stride = clip.pool1_stride or (clip.pool1_kernel[0], 2, 2)
        self.pool = nn.MaxPool3d(kernel_size=clip.pool1_kernel, stride=stride, padding=clip.pool1_padding)

    def reset_parameters(self) -> None:
        _msra_fill(self.conv)
        self.bn.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.bn(self.conv(x))))


class Bottleneck(nn.Module):
    """Residual bottleneck block, optionally followed by a non-local block.

    Args:
        in_channels: channels of the block input.
        width: inner channels (the 3x3 conv); the output has 4 * width.
        stride: spatial stride, carried by the 3x3 conv (Caffe2 STRIDE_1X1 False).
        first_kernel: temporal kernel of the first 1x1 conv (3 = I3D3x1x1 inflation).
        middle_kernel: temporal kernel of the 3x3 conv (3 = I3D3x3x3 inflation).
        nonlocal_block: a module applied after the block's final ReLU, or None.

    Shapes: (B, in_channels, T, H, W) -> (B, 4 * width, T, H / stride, W / stride).
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        width: int,
        *,
        stride: int = 1,
        first_kernel: int = 1,
        middle_kernel: int = 1,
        nonlocal_block: nn.Module | None = None,
    ) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv3d(
            in_channels, width, (first_kernel, 1, 1), padding=(first_kernel // 2, 0, 0), bias=False
        )
        self.bn1 = nn.BatchNorm3d(width, eps=BN_EPS)
        self.conv2 = nn.Conv3d(
            width,
            width,
            (middle_kernel, 3, 3),
            stride=(1, stride, stride),
            padding=(middle_kernel // 2, 1, 1),
            bias=False,
        )
        self.bn2 = nn.BatchNorm3d(width, eps=BN_EPS)
        self.conv3 = nn.Conv3d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_channels, eps=BN_EPS)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=(1, stride, stride), bias=False),
                nn.BatchNorm3d(out_channels, eps=BN_EPS),
            )
        self.nonlocal_block = nonlocal_block

    def reset_parameters(self) -> None:
        """MSRA convs, BN γ=1 β=0, except the last BN of the branch at γ=0 (Caffe2 BN_INIT_GAMMA 0.0).

        The non-local block keeps its own initialisation.
        """
        for conv in (self.conv1, self.conv2, self.conv3):
            _msra_fill(conv)
        for bn in (self.bn1, self.bn2, self.bn3):
            bn.reset_parameters()
        nn.init.zeros_(self.bn3.weight)
        if self.downsample is not None:
            _msra_fill(self.downsample[0])
            self.downsample[1].reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.relu(self.bn3(self.conv3(out)) + identity)
        if self.nonlocal_block is not None:
            out = self.nonlocal_block(out)
        return out


class Head(nn.Module):
    """Fixed average pool [T, 7, 7] stride 1, dropout, fully connected classifier.

    The temporal kernel covers the whole res5 clip (the official ``pool_stride`` equals the res5 length
    for clips of the trained length); the spatial kernel is 7, or the map size when the map is smaller.

    Args:
        in_channels: channels of the res5 map (2048 in the paper).
        num_classes: classifier outputs.
        dropout: dropout probability after pooling (0.5 in the paper).
        pool: "fixed" for the official pool above, "global" for an average over the whole map (mmaction2's
            adaptive pool; the two agree on maps up to 7 x 7).
    """

    def __init__(self, in_channels: int, num_classes: int, dropout: float, pool: str = "fixed") -> None:
        super().__init__()
        if pool not in ("fixed", "global"):
            raise ValueError(f"head pool must be 'fixed' or 'global', got {pool!r}")
        self.pool_kind = pool
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, C, 1, H - 6, W - 6) for H, W >= 7, else (B, C, 1, 1, 1); global: 1 x 1 x 1."""
        if self.pool_kind == "global":
            return features.mean(dim=(2, 3, 4), keepdim=True)
        _, _, t, h, w = features.shape
        kernel = (t, min(HEAD_POOL_SPATIAL, h), min(HEAD_POOL_SPATIAL, w))
        return F.avg_pool3d(features, kernel_size=kernel, stride=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) res5 features -> (B, num_classes) logits.

        On a 224 x 224 input the pooled map is 1 x 1 x 1; on larger inputs the pooled map is averaged
        before the fc, which equals the mean of the fully-convolutional logits.
        """
        pooled = self.pool(features).mean(dim=(2, 3, 4))
        return self.fc(self.dropout(pooled))

    def forward_dense(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) res5 features -> (B, num_classes, t, h, w) logits, the fc as a 1 x 1 x 1 conv."""
        pooled = self.dropout(self.pool(features))
        weight = self.fc.weight[:, :, None, None, None]
        return F.conv3d(pooled, weight, self.fc.bias)


class ResNet3d(nn.Module):
    """A C2D / I3D ResNet for video classification, optionally with non-local blocks.

    Build it through `nlnet.models.create`; the arguments here are the explicit numbers a preset resolves to.

    Args:
        stage_blocks: blocks per stage res2..res5, e.g. (3, 4, 6, 3).
        base_width: stem width; stage widths are base_width * (1, 2, 4, 8), outputs 4x that.
        stem_kernel: temporal kernel of conv1.
        first_kernels: per stage, per block, temporal kernel of the bottleneck's first 1x1 conv.
        middle_kernels: per stage, per block, temporal kernel of the bottleneck's 3x3 conv.
        clip: stem settings of the clip format.
        nonlocal_positions: {stage: block indices}; a non-local block follows each listed block.
        nonlocal_options: keyword arguments of `nlnet.NonLocalBlock` besides the channel count.
        nonlocal_temporal_groups: {stage: frames per group} for blocks that attend within groups of
            consecutive frames (the official long-clip models: {"res3": 4}); other stages attend globally.
        num_classes: classifier outputs.
        dropout: dropout before the classifier.
        in_channels: input channels.
        head_pool: "fixed" or "global", see `Head`.

    Shapes: forward (B, 3, T, H, W) -> (B, num_classes).
    """

    def __init__(
        self,
        *,
        stage_blocks: tuple[int, ...],
        base_width: int,
        stem_kernel: int,
        first_kernels: tuple[tuple[int, ...], ...],
        middle_kernels: tuple[tuple[int, ...], ...],
        clip: Clip,
        nonlocal_positions: dict[str, tuple[int, ...]],
        nonlocal_options: dict,
        nonlocal_temporal_groups: dict[str, int] | None = None,
        num_classes: int,
        dropout: float,
        in_channels: int = 3,
        head_pool: str = "fixed",
    ) -> None:
        super().__init__()
        self.stem = Stem(in_channels, base_width, stem_kernel, clip)
        channels = base_width
        for index, stage in enumerate(STAGES):
            width = base_width * 2**index
            blocks = []
            for block_index in range(stage_blocks[index]):
                out_channels = width * Bottleneck.expansion
                nonlocal_block = None
                if block_index in nonlocal_positions.get(stage, ()):
                    groups = (nonlocal_temporal_groups or {}).get(stage)
                    nonlocal_block = NonLocalBlock(out_channels, temporal_groups=groups, **nonlocal_options)
                blocks.append(
                    Bottleneck(
                        channels,
                        width,
                        stride=2 if index > 0 and block_index == 0 else 1,
                        first_kernel=first_kernels[index][block_index],
                        middle_kernel=middle_kernels[index][block_index],
                        nonlocal_block=nonlocal_block,
                    )
                )
                channels = out_channels
            self.add_module(stage, nn.Sequential(*blocks))
            if stage == "res2":
                self.pool2 = nn.MaxPool3d(kernel_size=(2, 1, 1), stride=(2, 1, 1))
        self.head = Head(channels, num_classes, dropout, pool=head_pool)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every layer as the official code does; non-local blocks keep their own init."""
        self.stem.reset_parameters()
        for stage in STAGES:
            for block in getattr(self, stage):
                block.reset_parameters()
        self.head.reset_parameters()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) clip -> (B, 2048, T5, H5, W5) res5 features (4 x 7 x 7 for 32 x 224 x 224)."""
        if x.dim() != 5:
            raise ValueError(f"expected a clip of shape (B, C, T, H, W), got shape {tuple(x.shape)}")
        x = self.res2(self.stem(x))
        if x.shape[2] < 2:
            raise ValueError(
                "the clip is too short: pool2 halves time after res2, which has only "
                f"{x.shape[2]} frame(s) here; use more input frames"
            )
        x = self.pool2(x)
        return self.res5(self.res4(self.res3(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) clip -> (B, num_classes) logits."""
        return self.head(self.forward_features(x))

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Fully-convolutional testing: (B, 3, T, H, W) -> (B, num_classes, t, h, w) logits.

        The fc acts as a 1 x 1 x 1 conv after the fixed [T, 7, 7] stride-1 average pool; 256 x 256 crops give
        a 2 x 2 map. Apply softmax (or sigmoid) at each location, then average.
        """
        return self.head.forward_dense(self.forward_features(x))
