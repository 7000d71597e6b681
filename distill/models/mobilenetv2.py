"""MobileNetV2 for CIFAR (Sandler et al., CVPR 2018), as the KD benchmarks use it.

RepDistiller's ``models/mobilenetv2.py`` (from "Knowledge Distillation via Route Constrained
Optimization"), whose ``mobile_half`` (width 0.5, expansion 6) the KD tables call MobileNetV2:
a stride-2 3x3 stem, seven groups of inverted residual blocks (expansion 1x1 - depthwise 3x3 -
linear 1x1; even the expansion-1 group has its 1x1 expansion conv), a 1x1 conv to 1280 channels,
global average pooling and a linear classifier. The total stride is 16, so the explained layer,
the 1280-channel conv's output after its ReLU, is only ``(B, 1280, 2, 2)`` at 32 px.
"""

from __future__ import annotations

from torch import Tensor, nn

# (expansion, channels, blocks, stride of the first block) per group; None: the network's expansion.
GROUPS = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
          (None, 160, 3, 2), (None, 320, 1, 1))
AT_GROUPS = (1, 2, 4, 6)  # the group outputs that attention transfer compares (RepDistiller's features 1-4)
LAST_CHANNELS = 1280


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
            relu: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(out_channels)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


class InvertedResidual(nn.Module):
    """``x + linear1x1(dw3x3(expand1x1(x)))``; the residual only where the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.conv = nn.Sequential(
            *conv_bn(in_channels, hidden, 1),
            *conv_bn(hidden, hidden, 3, stride, groups=hidden),
            *conv_bn(hidden, out_channels, 1, relu=False),
        )
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32 x 32 inputs, group widths scaled by ``width``.

    ``forward_features(x)``: ``(B, 3, H, W) -> (B, 1280, H/16, W/16)``, the last 1x1 conv after its ReLU.
    ``forward_head(a)``: ``(B, 1280, h, w) -> (B, C)`` logits (global average pool + linear).
    ``forward_stages(x)``: the features and the outputs of groups 1, 2, 4 and 6 (for AT).
    """

    def __init__(self, num_classes: int, width: float = 0.5, expansion: int = 6):
        super().__init__()
        channels = int(32 * width)
        self.stem = nn.Sequential(*conv_bn(3, channels, 3, stride=2))
        groups = []
        for t, c, n, s in GROUPS:
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(channels, int(c * width), s if i == 0 else 1, t or expansion))
                channels = int(c * width)
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.ModuleList(groups)
        last = int(LAST_CHANNELS * width) if width > 1.0 else LAST_CHANNELS
        self.head_conv = nn.Sequential(*conv_bn(channels, last, 1))
        self.classifier = nn.Linear(last, num_classes)
        self.num_features = last
        self.num_classes = num_classes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_stages(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Explained activations ``(B, 1280, h, w)`` and the outputs of groups 1, 2, 4 and 6."""
        out = self.stem(x)
        stages = []
        for i, group in enumerate(self.groups):
            out = group(out)
            if i in AT_GROUPS:
                stages.append(out)
        return self.head_conv(out), stages

    def forward_features(self, x: Tensor) -> Tensor:
        return self.forward_stages(x)[0]

    def forward_head(self, a: Tensor) -> Tensor:
        return self.classifier(a.mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def mobilenetv2(num_classes: int = 100, width: float = 0.5, expansion: int = 6) -> MobileNetV2:
    """The KD tables' MobileNetV2: RepDistiller's ``mobile_half`` (width 0.5, expansion 6)."""
    return MobileNetV2(num_classes, width=width, expansion=expansion)


__all__ = ["InvertedResidual", "MobileNetV2", "mobilenetv2"]
