"""timm and torchvision classifiers behind the model contract (``distill.models.contract``).

``TimmNetwork``: timm's own ``forward_features`` / ``forward_head`` (channels-last outputs such as
Swin's ``(B, h, w, K)`` are permuted to ``(B, K, h, w)``), ``forward_stages`` from timm's
``forward_intermediates``; another explained layer (``layer=``) splits the traced graph.
``TorchvisionNetwork``: split with torch.fx at the explained layer (default: the input of the global
pool, i.e. the last feature stage).

Pretrained weights load from the local cache or download; offline without a cache, one line says
what to do.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill.download import download_timeout
from distill.errors import ConfigError, DistillError
from distill.models.split import last_stage, split_at


def _offline_error(what: str, err: Exception, fix: str) -> DistillError:
    return DistillError(f"{what}: the pretrained weights are neither cached nor downloadable here "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). {fix}")


class SplitNetwork(nn.Module):
    """A network cut at its explained layer: ``body`` ``(B, 3, H, W) -> (B, K, h, w)``, ``head`` ``-> (B, C)``."""

    def __init__(self, body: nn.Module, head: nn.Module, num_classes: int, layer: str) -> None:
        super().__init__()
        self.body, self.head = body, head
        self.num_classes, self.layer = num_classes, layer

    def forward_features(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return out["features"] if isinstance(out, dict) else out

    def forward_head(self, a: Tensor) -> Tensor:
        return self.head(a)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------- timm
class TimmNetwork(nn.Module):
    """A timm classifier; the explained layer is the output of timm's ``forward_features``."""

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.model, self.num_classes = model, num_classes
        self.channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"  # e.g. Swin

    def forward_features(self, x: Tensor) -> Tensor:
        features = self.model.forward_features(x)
        return features.permute(0, 3, 1, 2) if self.channels_last else features

    def forward_head(self, a: Tensor) -> Tensor:
        return self.model.forward_head(a.permute(0, 2, 3, 1) if self.channels_last else a)

    def forward_stages(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``(features, stage outputs (B, K_i, h_i, w_i))`` from timm's ``forward_intermediates``."""
        stages = self.model.forward_intermediates(x, intermediates_only=True, output_fmt="NCHW")
        return self.forward_features(x), [s for s in stages if s.dim() == 4]

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# timm families that dilate their last stages for ``output_stride`` 8 / 16 (timm 1.0; measured by
# tests/test_models.py): the rest refuse the option (MobileNetV3, DenseNet, VGG, GhostNet, DLA,
# HRNet, FastViT, ViTs).
OUTPUT_STRIDE_FAMILIES = ("resnet", "resnext", "convnext", "efficientnet", "mobilenetv2", "regnet", "cspnet",
                          "repvgg", "rexnet")
OUTPUT_STRIDES = (8, 16, 32)


def _output_stride(arch: str, output_stride: int | None) -> dict:
    """timm's ``output_stride`` option, checked; ``{}`` for the model's own (null)."""
    if output_stride is None:
        return {}
    if output_stride not in OUTPUT_STRIDES:
        raise ConfigError(f"output_stride={output_stride} for timm model {arch}: use one of {OUTPUT_STRIDES} "
                          "or null (the model's own)")
    return {"output_stride": int(output_stride)}


def _no_output_stride(arch: str, output_stride: int) -> ConfigError:
    return ConfigError(
        f"timm model {arch} does not support output_stride={output_stride} (no dilated stages); families that do: "
        f"{', '.join(OUTPUT_STRIDE_FAMILIES)}. Fix: one of those, a larger data.image_size, or an earlier layer=")


def timm_network(num_classes: int, arch: str = "resnet18", pretrained: bool = False, layer: str | None = None,
                 output_stride: int | None = None, **options) -> nn.Module:
    """``timm.create_model(arch, num_classes=...)`` behind the contract; ``options`` go to timm
    (e.g. ``drop_rate``, ``img_size``). ``output_stride`` 8 / 16 dilates the last stages so the
    explained map is 4x / 2x finer per side (null: the model's own, usually 32)."""
    import timm

    if arch not in timm.list_models() and arch.split(".")[0] not in timm.list_models():
        raise ConfigError(f"arch={arch!r} is not a timm model; list them with `python -c \"import timm; "
                          "print(timm.list_models('resnet*'))\"`")
    stride = _output_stride(arch, output_stride)
    try:
        with download_timeout():
            model = timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **stride, **options)
    except (TypeError, AssertionError) as err:
        if stride and (isinstance(err, AssertionError) or "output_stride" in str(err)):
            raise _no_output_stride(arch, output_stride) from None
        if isinstance(err, AssertionError):
            raise
        raise ConfigError(f"timm model {arch} does not take these options {sorted(options)}: {err}") from None
    except (OSError, RuntimeError) as err:
        if not pretrained:
            raise
        raise _offline_error(f"timm model {arch} with pretrained=true", err,
                             "Fix: run the same command once on a machine with internet (timm caches the weights "
                             "in the Hugging Face cache, HF_HOME), or use pretrained=false") from None
    if layer is None:
        return TimmNetwork(model, num_classes)
    body, head = split_at(model, layer, f"timm model {arch}")
    return SplitNetwork(body, head, num_classes, layer)


# --------------------------------------------------------------------------- torchvision
# torchvision archs that take replace_stride_with_dilation (their Bottleneck blocks dilate; the
# BasicBlock of resnet18 / resnet34 does not).
DILATED_TORCHVISION = ("resnet50", "resnet101", "resnet152", "resnext", "wide_resnet")
def _replace_classifier(model: nn.Module, num_classes: int) -> None:
    """A new ``num_classes``-way last linear layer (for weights trained on another label set)."""
    name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.Linear(last.in_features, num_classes))


def torchvision_network(num_classes: int, arch: str = "resnet18", weights: str | None = None,
                        layer: str | None = None, replace_stride_with_dilation: list[bool] | None = None,
                        **options) -> nn.Module:
    """``torchvision.models.get_model(arch, weights=...)`` split at ``layer`` (default: the input of
    the global pool). ``weights`` takes torchvision's enum names (``IMAGENET1K_V1``, ``DEFAULT``);
    with a class count other than the weights', the last linear layer is new.
    ``replace_stride_with_dilation`` (bottleneck ResNets only: resnet50 and up, ResNeXts, Wide
    ResNets), e.g. ``[false, true, true]``: layer3 and layer4 dilate instead of striding, so the
    explained map is 4x finer per side (null: the model's own)."""
    from torchvision import models

    if replace_stride_with_dilation is not None:
        if not arch.startswith(DILATED_TORCHVISION) or arch in ("resnet18", "resnet34"):
            families = ", ".join(DILATED_TORCHVISION)
            raise ConfigError(
                f"replace_stride_with_dilation is an option of torchvision's bottleneck ResNets ({families}; "
                f"resnet18 / resnet34 refuse dilation), not of {arch}: use one of them, or timm's "
                f"(e.g. timm arch={arch if arch.startswith('resnet') else 'resnet18'} output_stride=8), or a larger "
                "data.image_size")
        if len(replace_stride_with_dilation) != 3:
            raise ConfigError(f"replace_stride_with_dilation={list(replace_stride_with_dilation)}: give three "
                              "booleans, for layer2, layer3 and layer4 (e.g. [false,true,true])")
        options["replace_stride_with_dilation"] = [bool(v) for v in replace_stride_with_dilation]

    if arch not in models.list_models(module=models):
        raise ConfigError(f"arch={arch!r} is not a torchvision classifier; choose one of "
                          f"torchvision.models.list_models() (e.g. resnet18, mobilenet_v3_small, convnext_tiny)")
    weight_enum = None
    if weights is not None:
        try:
            weight_enum = models.get_model_weights(arch)[weights]
        except KeyError:
            names = [w.name for w in models.get_model_weights(arch)]
            raise ConfigError(f"weights={weights!r} is not a weight set of {arch}; choose one of {names}") from None
    same_classes = weight_enum is None or len(weight_enum.meta["categories"]) == num_classes
    try:
        with download_timeout():
            classes = {"num_classes": num_classes} if same_classes else {}  # else: the weights' head, replaced
            model = models.get_model(arch, weights=weight_enum, **classes, **options)
    except TypeError as err:
        raise ConfigError(f"torchvision model {arch} does not take these options {sorted(options)}: {err}") from None
    except (OSError, RuntimeError) as err:
        if weight_enum is None:
            raise
        raise _offline_error(f"torchvision {arch} with weights={weights}", err,
                             f"Fix: on a machine with internet run `python -c \"import torchvision; "
                             f"torchvision.models.get_model('{arch}', weights='{weights}')\"` and copy "
                             f"{torch.hub.get_dir()}/checkpoints/ here (or set TORCH_HOME), or use weights=null"
                             ) from None
    if not same_classes:
        _replace_classifier(model, num_classes)
    layer = layer or last_stage(model, "avgpool", f"torchvision model {arch}")
    body, head = split_at(model, layer, f"torchvision model {arch}")
    return SplitNetwork(body, head, num_classes, layer)
