"""The CIFAR VGGs of the KD benchmarks (Simonyan & Zisserman, 2015, with BN; the RepDistiller / CRD zoo).

Five blocks of conv3x3-BN-ReLU layers, a 2x2 max-pool before blocks 1, 2 and 3 (32 -> 16 -> 8 -> 4
pixels; blocks 3 and 4 both run at 4 x 4), global average pooling and one linear layer: the
ImageNet VGG's fully connected layers are dropped (RepDistiller's ``models/vgg.py``, whose
``vggN_bn`` networks the KD tables call ``vggN``; it pools once more before block 4 at 64 px).
These are not the VOC networks ``vgg16`` / ``vgg11_student`` (distill/models/vgg.py): the CIFAR
VGG-16 is registered as ``vgg16_cifar``.

The explained layer is block 4's output after its ReLU: ``(B, 512, 4, 4)`` at 32 px.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

# Conv widths of the five blocks (RepDistiller's configurations S, A, B, D, E).
LAYERS: dict[int, tuple[tuple[int, ...], ...]] = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}
POOLED_BLOCKS = (1, 2, 3)  # a 2x2 max-pool runs before each of these blocks


def conv_block(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers)


class CifarVGG(nn.Module):
    """VGG-``depth`` with BN for 32 x 32 inputs.

    ``forward_features(x)``: ``(B, 3, H, W) -> (B, 512, H/8, W/8)``, block 4 after its ReLU.
    ``forward_head(a)``: ``(B, 512, h, w) -> (B, C)`` logits (global average pool + linear).
    ``forward_stages(x)``: the features and the outputs of blocks 1-4 (for AT).
    """

    def __init__(self, depth: int, num_classes: int):
        super().__init__()
        if depth not in LAYERS:
            raise ValueError(f"CIFAR VGG depth must be one of {sorted(LAYERS)}, got {depth}")
        widths = LAYERS[depth]
        in_channels = [3] + [block[-1] for block in widths[:-1]]
        self.blocks = nn.ModuleList(conv_block(c, w) for c, w in zip(in_channels, widths, strict=True))
        self.classifier = nn.Linear(widths[-1][-1], num_classes)
        self.num_features = widths[-1][-1]
        self.num_classes = num_classes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_stages(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Explained activations ``(B, 512, h, w)`` and the outputs of blocks 1-4 (the last is the features)."""
        stages = []
        for i, block in enumerate(self.blocks):
            if i in POOLED_BLOCKS:
                x = F.max_pool2d(x, 2)
            x = block(x)
            if i > 0:
                stages.append(x)
        return x, stages

    def forward_features(self, x: Tensor) -> Tensor:
        return self.forward_stages(x)[0]

    def forward_head(self, a: Tensor) -> Tensor:
        return self.classifier(a.mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def vgg8(num_classes: int = 100) -> CifarVGG:
    return CifarVGG(8, num_classes)


def vgg11(num_classes: int = 100) -> CifarVGG:
    return CifarVGG(11, num_classes)


def vgg13(num_classes: int = 100) -> CifarVGG:
    return CifarVGG(13, num_classes)


def vgg16_cifar(num_classes: int = 100) -> CifarVGG:
    return CifarVGG(16, num_classes)


def vgg19(num_classes: int = 100) -> CifarVGG:
    return CifarVGG(19, num_classes)


__all__ = ["CifarVGG", "vgg8", "vgg11", "vgg13", "vgg16_cifar", "vgg19"]
