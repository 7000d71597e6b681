"""The CIFAR ResNets of the KD benchmarks (He et al., CVPR 2016, §4.2; the RepDistiller / CRD zoo).

A 3x3 stem and three stages of ``n`` post-activation basic blocks at 32, 16 and 8 pixels
(``depth = 6n + 2``), global average pooling and a linear classifier. ``resnet8`` ... ``resnet110``
use stage widths ``16, 32, 64``; ``resnet8x4`` / ``resnet32x4`` four times that. A block that changes
shape has a 1x1 conv + BN shortcut (He et al.'s option B, as in RepDistiller's ``models/resnet.py``).

The explained layer is the last block's output, after its final ReLU: ``(B, 64w, 8, 8)`` at 32 px.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn(in_planes: int, out_planes: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(out_planes)
    )


class BasicBlock(nn.Module):
    """``ReLU(BN(conv3x3(ReLU(BN(conv3x3(x))))) + shortcut(x))``."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(in_planes, planes, 3, stride)
        self.conv2 = conv_bn(planes, planes, 3)
        self.shortcut = (
            None if stride == 1 and in_planes == planes else conv_bn(in_planes, planes, 1, stride)
        )

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.conv2(F.relu(self.conv1(x))) + residual)


class CifarResNet(nn.Module):
    """ResNet-``depth`` for 32 x 32 inputs with stem width ``widths[0]`` and stage widths ``widths[1:]``.

    ``forward_features(x)``: ``(B, 3, H, W) -> (B, widths[3], H/4, W/4)``, the last block's output.
    ``forward_head(a)``: ``(B, K, h, w) -> (B, C)`` logits (global average pool + linear).
    ``forward_stages(x)``: the features and the three stage outputs (for AT).
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (e.g. 8, 20, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.stem = conv_bn(3, widths[0], 3)
        self.stages = nn.ModuleList(
            self._stage(widths[i], widths[i + 1], n, stride=1 if i == 0 else 2) for i in range(3)
        )
        self.fc = nn.Linear(widths[3], num_classes)
        self.num_features = widths[3]
        self.num_classes = num_classes
        for m in self.modules():  # the linear layer keeps PyTorch's default initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            *(BasicBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1) for i in range(n))
        )

    def forward_stages(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Explained activations ``(B, K, h, w)`` and the three stage outputs (the last is the features)."""
        out = F.relu(self.stem(x))
        stages = []
        for stage in self.stages:
            out = stage(out)
            stages.append(out)
        return out, stages

    def forward_features(self, x: Tensor) -> Tensor:
        return self.forward_stages(x)[0]

    def forward_head(self, a: Tensor) -> Tensor:
        return self.fc(a.mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


NARROW = (16, 16, 32, 64)
WIDE = (32, 64, 128, 256)  # the "x4" networks


def resnet8(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, NARROW, num_classes)


def resnet14(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(14, NARROW, num_classes)


def resnet20(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(20, NARROW, num_classes)


def resnet32(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, NARROW, num_classes)


def resnet44(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(44, NARROW, num_classes)


def resnet56(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(56, NARROW, num_classes)


def resnet110(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(110, NARROW, num_classes)


def resnet8x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, WIDE, num_classes)


def resnet32x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, WIDE, num_classes)


__all__ = [
    "CifarResNet",
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
]
