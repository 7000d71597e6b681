"""VGG networks for PASCAL VOC (Grad-CAM++ §5; docs/method.md §5): the VGG-16 teacher and an 11-layer student.

Both keep torchvision's module layout (``features`` / ``avgpool`` / ``classifier`` with the
same indices), so torchvision's ImageNet weights load into the teacher unchanged.

- ``forward_features(x)``: the output of the last convolutional block *before* the final
  max-pool (the layer Grad-CAM explains in VGG), ``(B, 512, H/16, W/16)``: 14x14 at 224.
- ``forward_head(a)``: final max-pool, adaptive average pool to 7x7, then the three fully
  connected layers (with dropout) to the logits.

**Dropout and explanation maps.** Dropout sits between the explained layer and the logits, so a
train-mode map would be the map of a random thinned network (and not the network that is
evaluated). The rule here: *maps are always computed with the head's dropout off.* In eval
mode that is automatic. In train mode (the student's explanation loss) the maps go through
the model's ``map_head(features)`` (the model contract's deterministic head), which re-runs the head on
the same activations (a second, cheap pass through the FC layers; the differentiable graph to
the features and weights is kept); the cross-entropy / KD still use the dropped-out logits.
Dropout acts per sample, so it never mixes samples in the batched gradient either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distill.download import download_timeout
from distill.errors import ConfigError, DistillError

# torchvision's configurations: numbers are conv output channels, "M" a 2x2 max-pool.
VGG11_LAYERS: tuple = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
VGG16_LAYERS: tuple = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

# Hidden width of the student's two hidden FC layers: 26.98 M parameters for 20 classes
# (VGG-11 conv stack with BN: 9.23 M; FC 25088 -> 688 -> 688 -> 20: 17.75 M).
STUDENT_HIDDEN = 688
FINETUNE = ("head", "all")


def _scaled(layers: Sequence, width: float) -> list:
    if width <= 0:
        raise ConfigError(f"VGG width multiplier must be > 0, got {width}")
    return [v if v == "M" else max(1, round(v * width)) for v in layers]


def make_layers(layers: Sequence, batch_norm: bool) -> nn.Sequential:
    """torchvision's ``make_layers``: conv3x3(-BN)-ReLU blocks and 2x2 max-pools."""
    modules: list[nn.Module] = []
    in_channels = 3
    for v in layers:
        if v == "M":
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            modules.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
            if batch_norm:
                modules.append(nn.BatchNorm2d(v))
            modules.append(nn.ReLU(inplace=True))
            in_channels = v
    return nn.Sequential(*modules)


class VGG(nn.Module):
    """VGG with a 3-layer FC head and the ``forward_features`` / ``forward_head`` split.

    ``features[:-1]`` is the explained stack (ends with the last conv block's ReLU),
    ``features[-1]`` the final max-pool, which belongs to the head.
    """

    def __init__(self, layers: Sequence, num_classes: int, hidden: int = 4096, dropout: float = 0.5,
                 batch_norm: bool = False, pool_size: int = 7) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"VGG dropout must be in [0, 1), got {dropout}")
        if hidden < 1 or pool_size < 1:
            raise ConfigError(f"VGG hidden width and pool size must be >= 1, got {hidden} and {pool_size}")
        if layers[-1] != "M":
            raise ValueError("a VGG layer configuration must end with a max-pool ('M')")
        self.features = make_layers(layers, batch_norm)
        channels = [v for v in layers if v != "M"][-1]
        self.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        self.classifier = nn.Sequential(
            nn.Linear(channels * pool_size * pool_size, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        self.num_features = channels
        self.num_classes = num_classes
        self.dropout = dropout
        self._init_weights()

    def _init_weights(self) -> None:  # torchvision's VGG initialisation
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

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, 512, H/16, W/16)``: the last conv block, before the final max-pool."""
        return self.features[:-1](x)

    def forward_head(self, a: Tensor, dropout: bool = True) -> Tensor:
        """Logits from the explained activations; ``dropout=False`` runs the head deterministically
        (the FC layers' dropout is off even in train mode)."""
        out = torch.flatten(self.avgpool(self.features[-1](a)), 1)
        if dropout:
            return self.classifier(out)
        for layer in self.classifier:
            if not isinstance(layer, nn.Dropout):
                out = layer(out)
        return out

    def map_head(self, a: Tensor) -> Tensor:
        """The deterministic head that explanation maps are differentiated through (dropout off)."""
        return self.forward_head(a, dropout=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def freeze_features(self) -> None:
        """Fine-tune the head only: the conv stack gets ``requires_grad=False`` (it has no BN
        in VGG-16, so no running statistics move either)."""
        self.features.requires_grad_(False)


# ------------------------------------------------------------------------------ weights
def imagenet_vgg16_state() -> dict[str, Tensor]:
    """torchvision's ``VGG16_Weights.IMAGENET1K_V1`` state dict, from the torch hub cache or
    downloaded; a ``DistillError`` saying what to do when neither works."""
    from torchvision.models import VGG16_Weights

    weights = VGG16_Weights.IMAGENET1K_V1
    cache = f"{torch.hub.get_dir()}/checkpoints/{weights.url.rsplit('/', 1)[-1]}"
    try:
        with download_timeout():
            return torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True)
    except Exception as err:  # URLError, socket timeouts, a torn or hash-mismatched file
        raise DistillError(
            f"teacher=vgg16 with teacher.pretrained=true needs torchvision's ImageNet weights, which "
            f"are neither in the torch hub cache ({cache}) nor downloadable here "
            f"({type(err).__name__}: {err}). Fix: on a machine with internet run "
            "`python -c \"import torchvision; torchvision.models.vgg16(weights='IMAGENET1K_V1')\"` and "
            f"copy the file it writes (<torch hub dir>/checkpoints/{cache.rsplit('/', 1)[-1]}) to {cache} "
            "(or point TORCH_HOME to a folder holding hub/checkpoints/ with it); or train from scratch "
            "with teacher.pretrained=false"
        ) from None


def vgg16(num_classes: int = 20, pretrained: bool = False, finetune: str = "all", dropout: float = 0.5,
          width: float = 1.0, hidden: int = 4096) -> VGG:
    """The VGG-16 teacher (torchvision's architecture, no BN) with a ``num_classes``-way head.

    ``pretrained``: load torchvision's ImageNet weights into everything but the last FC layer
    (new, randomly initialised). ``finetune``: ``"all"`` trains every layer, ``"head"`` freezes
    the conv stack and trains the three FC layers. ``width`` / ``hidden`` shrink the network
    for smoke tests (the ImageNet weights need the defaults).
    """
    if finetune not in FINETUNE:
        raise ConfigError(f"teacher.finetune '{finetune}' is unknown; choose one of {FINETUNE}")
    if pretrained and (width != 1.0 or hidden != 4096):
        raise ConfigError(
            f"teacher.pretrained=true loads VGG-16's ImageNet weights, which need width=1 and hidden=4096 "
            f"(got width={width}, hidden={hidden}); set teacher.pretrained=false for a smaller VGG"
        )
    state = imagenet_vgg16_state() if pretrained else None  # fail before building 134 M parameters
    model = VGG(_scaled(VGG16_LAYERS, width), num_classes, hidden=hidden, dropout=dropout)
    if state is not None:
        head = ("classifier.6.weight", "classifier.6.bias")
        state = {k: v for k, v in state.items() if k not in head}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if sorted(missing) != sorted(head) or unexpected:
            raise DistillError(f"the VGG-16 ImageNet weights do not fit (missing {missing}, unexpected {unexpected})")
    if finetune == "head":
        model.freeze_features()
    return model


def vgg11_student(num_classes: int = 20, hidden: int = STUDENT_HIDDEN, dropout: float = 0.5,
                  batch_norm: bool = True, width: float = 1.0) -> VGG:
    """The 11-layer student: VGG-11's 8 conv layers (with BN by default: it trains from scratch)
    and 3 FC layers ``25088 -> hidden -> hidden -> C``; 26.98 M parameters for 20 classes."""
    return VGG(_scaled(VGG11_LAYERS, width), num_classes, hidden=hidden, dropout=dropout, batch_norm=batch_norm)


__all__ = ["VGG", "imagenet_vgg16_state", "make_layers", "vgg11_student", "vgg16"]
