"""Wide Residual Networks (Zagoruyko & Komodakis, 2016) for 32x32 inputs.

Pre-activation basic blocks, group widths ``16, 16k, 32k, 64k``, final BN + ReLU,
global average pooling and a linear classifier. The explained layer is the output of the
final BN + ReLU, so no batch-statistics BatchNorm sits between it and the logits (docs/method.md §6).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut = (
            None
            if in_planes == out_planes and stride == 1
            else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        # When the block changes shape, the shortcut also starts from the activated input.
        residual = x if self.shortcut is None else self.shortcut(o)
        o = F.relu(self.bn2(self.conv1(o)))
        if self.drop_rate > 0:
            o = F.dropout(o, p=self.drop_rate, training=self.training)
        return self.conv2(o) + residual


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``; ``depth = 6n + 4``.

    ``forward_features(x)``: ``(B, 3, H, W) -> (B, 64k, H/4, W/4)``, after the final BN + ReLU.
    ``forward_head(a)``: ``(B, 64k, h, w) -> (B, C)`` logits (global average pool + linear).
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n + 4 (e.g. 16, 28, 40), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.groups = nn.ModuleList(
            self._group(widths[i], widths[i + 1], n, stride=1 if i == 0 else 2, drop=drop_rate)
            for i in range(3)
        )
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.num_features = widths[3]
        self.num_classes = num_classes
        self._init_weights()

    @staticmethod
    def _group(in_planes: int, out_planes: int, n: int, stride: int, drop: float) -> nn.Sequential:
        return nn.Sequential(
            *(
                BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop)
                for i in range(n)
            )
        )

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_stages(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Explained activations ``(B, 64k, h, w)`` and the three group outputs (for AT)."""
        out = self.conv1(x)
        groups = []
        for group in self.groups:
            out = group(out)
            groups.append(out)
        return F.relu(self.bn(out)), groups

    def forward_features(self, x: Tensor) -> Tensor:
        return self.forward_stages(x)[0]

    def forward_head(self, a: Tensor) -> Tensor:
        return self.fc(a.mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def wrn40_2(num_classes: int = 10, **kw) -> WideResNet:
    return WideResNet(40, 2, num_classes, **kw)


def wrn16_2(num_classes: int = 10, **kw) -> WideResNet:
    return WideResNet(16, 2, num_classes, **kw)


def wrn16_1(num_classes: int = 10, **kw) -> WideResNet:
    return WideResNet(16, 1, num_classes, **kw)


__all__ = ["WideResNet", "BasicBlock", "wrn16_1", "wrn16_2", "wrn40_2"]
