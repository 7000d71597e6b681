"""ShuffleNet V1 (Zhang et al., CVPR 2018) and V2 (Ma et al., ECCV 2018) for CIFAR, as the KD
benchmarks use them (RepDistiller's ``models/ShuffleNetv1.py`` / ``ShuffleNetv2.py``).

A 1x1 stem at full resolution (no stride, no max-pool) and three stages that each halve the
resolution, so the explained layer is ``(B, K, 4, 4)`` at 32 px: V1's last stage output (960
channels, 3 groups), V2's final 1x1 conv to 1024 channels after its ReLU (stage widths 116, 232,
464: V2's 1x size). Global average pooling and a linear classifier. Both keep PyTorch's default
initialisation, as the reference does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """``(B, K, h, w)``: channel ``g * (K / groups) + i`` moves to ``i * groups + g`` (ShuffleNet §3.1)."""
    b, k, h, w = x.shape
    return x.view(b, groups, k // groups, h, w).transpose(1, 2).reshape(b, k, h, w)


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class ShuffleUnitV1(nn.Module):
    """Grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1; added to the input, or at stride 2
    concatenated with its 3x3 average pool; then ReLU. The first unit after the 24-channel stem
    uses an ungrouped first 1x1 (ShuffleNet §3.3)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        mid = out_channels // 4
        self.first_groups = 1 if in_channels == 24 else groups
        self.conv1 = conv_bn(in_channels, mid, 1, groups=self.first_groups)
        self.conv2 = conv_bn(mid, mid, 3, stride, groups=mid)
        self.conv3 = conv_bn(mid, out_channels, 1, groups=groups)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = channel_shuffle(F.relu(self.conv1(x)), self.first_groups)
        out = self.conv3(F.relu(self.conv2(out)))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleUnitV2(nn.Module):
    """Stride 1: half the channels pass through, the other half go 1x1 - depthwise 3x3 - 1x1;
    concatenated and shuffled. Stride 2 (``downsample``): both branches see the whole input and
    halve the resolution (ShuffleNet V2 Fig. 3 c, d)."""

    def __init__(self, in_channels: int, out_channels: int, downsample: bool):
        super().__init__()
        mid = out_channels // 2
        self.downsample = downsample
        if downsample:
            self.left = nn.Sequential(conv_bn(in_channels, in_channels, 3, 2, groups=in_channels),
                                      conv_bn(in_channels, mid, 1), nn.ReLU(inplace=True))
        branch_in = in_channels if downsample else mid
        stride = 2 if downsample else 1
        self.right = nn.Sequential(conv_bn(branch_in, mid, 1), nn.ReLU(inplace=True),
                                   conv_bn(mid, mid, 3, stride, groups=mid),
                                   conv_bn(mid, mid, 1), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample:
            out = torch.cat([self.left(x), self.right(x)], 1)
        else:
            kept, branch = x.chunk(2, dim=1)
            out = torch.cat([kept, self.right(branch)], 1)
        return channel_shuffle(out, 2)


class ShuffleNet(nn.Module):
    """Common frame: 1x1 stem (24 channels, BN, ReLU), three stages, optional last 1x1 conv.

    ``forward_features(x)``: ``(B, 3, H, W) -> (B, K, H/8, W/8)``.
    ``forward_head(a)``: ``(B, K, h, w) -> (B, C)`` logits (global average pool + linear).
    ``forward_stages(x)``: the features and the three stage outputs (for AT).
    """

    def __init__(self, stages: list[nn.Sequential], last_conv: nn.Module | None, num_features: int,
                 num_classes: int):
        super().__init__()
        self.stem = conv_bn(3, 24, 1)
        self.stages = nn.ModuleList(stages)
        self.last_conv = last_conv
        self.linear = nn.Linear(num_features, num_classes)
        self.num_features = num_features
        self.num_classes = num_classes

    def forward_stages(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        out = F.relu(self.stem(x))
        stages = []
        for stage in self.stages:
            out = stage(out)
            stages.append(out)
        return (out if self.last_conv is None else self.last_conv(out)), stages

    def forward_features(self, x: Tensor) -> Tensor:
        return self.forward_stages(x)[0]

    def forward_head(self, a: Tensor) -> Tensor:
        return self.linear(a.mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def shufflenetv1(num_classes: int = 100, widths: tuple[int, ...] = (240, 480, 960),
                 blocks: tuple[int, ...] = (4, 8, 4), groups: int = 3) -> ShuffleNet:
    """ShuffleNet V1 with 3 groups (RepDistiller's ``ShuffleV1``); ``(B, 960, 4, 4)`` at 32 px."""
    stages, channels = [], 24
    for width, n in zip(widths, blocks, strict=True):
        # The stride-2 unit concatenates its input: its branch adds width - input channels.
        units = [ShuffleUnitV1(channels, width - channels, 2, groups)]
        units += [ShuffleUnitV1(width, width, 1, groups) for _ in range(n - 1)]
        stages.append(nn.Sequential(*units))
        channels = width
    return ShuffleNet(stages, None, channels, num_classes)


def shufflenetv2(num_classes: int = 100, widths: tuple[int, ...] = (116, 232, 464), blocks: tuple[int, ...] = (3, 7, 3),
                 last_channels: int = 1024) -> ShuffleNet:
    """ShuffleNet V2 1x (RepDistiller's ``ShuffleV2``): each stage is a stride-2 unit and
    ``blocks`` stride-1 units; ``(B, 1024, 4, 4)`` at 32 px."""
    stages, channels = [], 24
    for width, n in zip(widths, blocks, strict=True):
        units = [ShuffleUnitV2(channels, width, downsample=True)]
        units += [ShuffleUnitV2(width, width, downsample=False) for _ in range(n)]
        stages.append(nn.Sequential(*units))
        channels = width
    last_conv = nn.Sequential(conv_bn(channels, last_channels, 1), nn.ReLU(inplace=True))
    return ShuffleNet(stages, last_conv, last_channels, num_classes)


__all__ = ["ShuffleNet", "ShuffleUnitV1", "ShuffleUnitV2", "channel_shuffle", "shufflenetv1", "shufflenetv2"]
