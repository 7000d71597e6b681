"""Pictures of explanations: resizing, normalising, guided backprop, overlays (docs/method.md §1).

Not used in the training path (these helpers may synchronise with the host). Shapes: images
``(B, 3, H, W)``; maps ``(B, h, w)`` or ``(B, T, h, w)``; targets ``(B,)`` class indices.

Guided backpropagation is done without module hooks and without editing the models: inside
``GuidedReLUMode`` (a ``TorchFunctionMode``) every ReLU call — ``F.relu`` (also
``inplace=True``), ``F.relu_``, ``torch.relu``, ``torch.relu_``, ``Tensor.relu``,
``Tensor.relu_``, and ``nn.ReLU`` which calls ``F.relu`` — runs a ReLU whose backward is
``grad.clamp(min=0) * (input > 0)``. This works for models that use functional ReLUs (WRN)
and in-place ReLUs, where module hooks do not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from distill.explain.network import model_maps


# --------------------------------------------------------------------------- maps
def resize_maps(maps: Tensor, size: int | Sequence[int]) -> Tensor:
    """Bilinear resize (``align_corners=False``) of ``(B, h, w)`` or ``(B, T, h, w)`` maps.

    ``size`` is ``(H, W)`` (or one int for a square) -> ``(B, H, W)`` or ``(B, T, H, W)``.
    """
    if maps.dim() not in (3, 4):
        raise ValueError(f"maps must be (B, h, w) or (B, T, h, w), got shape {tuple(maps.shape)}")
    size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"size must be (H, W), got {size}")
    if not maps.is_floating_point():
        maps = maps.float()
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size)


def normalize_maps(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-map min-max scaling to ``[0, 1]`` over the last two dims (any leading dims).

    ``(maps - min) / max(max - min, eps)``: a constant map becomes all zeros, never NaN.
    """
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - lo) / (hi - lo).clamp_min(eps)


def denormalize(
    images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor
) -> Tensor:
    """Undo ``(x - mean) / std`` channel normalisation and clamp to ``[0, 1]``.

    ``images`` ``(B, C, H, W)`` or ``(C, H, W)``; ``mean``, ``std`` of length ``C``.
    """
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).reshape(-1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).reshape(-1, 1, 1)
    return (images * std + mean).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- guided backprop
class GuidedReLU(torch.autograd.Function):
    """ReLU whose backward passes only positive gradients at positive inputs."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        # Save the mask, not the input: the in-place variant overwrites the input afterwards.
        ctx.save_for_backward(x > 0)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (positive,) = ctx.saved_tensors
        return grad.clamp(min=0) * positive


_RELU_OUT_OF_PLACE = {F.relu, torch.relu, torch.Tensor.relu}
_RELU_IN_PLACE = {torch.relu_, torch.Tensor.relu_}  # F.relu_ is torch.relu_


class GuidedReLUMode(TorchFunctionMode):
    """Context manager: every ReLU called inside it gets the guided-backprop backward.

    Catches ``F.relu`` (also ``inplace=True``), ``F.relu_``/``torch.relu_``, ``torch.relu``,
    ``Tensor.relu``/``Tensor.relu_`` and ``nn.ReLU`` modules. Other ops run unchanged.
    In-place calls still modify their input, as the model expects.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        in_place = func in _RELU_IN_PLACE or (func is F.relu and _inplace_arg(args, kwargs))
        if func not in _RELU_OUT_OF_PLACE and not in_place:
            return func(*args, **kwargs)
        x = args[0] if args else kwargs["input"]
        if not (torch.is_grad_enabled() and x.requires_grad):
            return func(*args, **kwargs)
        out = GuidedReLU.apply(x)
        return x.copy_(out) if in_place else out


def _inplace_arg(args: tuple, kwargs: dict) -> bool:
    return bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))


def _as_target(target: Tensor | int, batch: int, device: torch.device) -> Tensor:
    target = torch.as_tensor(target, device=device).long()
    if target.dim() == 0:
        target = target.expand(batch)
    if target.shape != (batch,):
        raise ValueError(f"target must be an int or a (B,) tensor, got shape {tuple(target.shape)}")
    return target


class _EvalMode:
    """Put every submodule in eval mode; restore each one's own flag on exit."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> nn.Module:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        for module, training in self.flags:
            module.training = training


def guided_backprop(model: nn.Module, images: Tensor, target: Tensor | int) -> Tensor:
    """Guided-backprop input gradients ``(B, 3, H, W)`` of the ``target`` logits.

    ``images`` ``(B, 3, H, W)``, ``target`` ``(B,)`` or one int. One batched ``autograd.grad``
    of the sum of the selected logits, with the model in eval mode (its previous modes are
    restored afterwards). Does not touch the parameters' ``.grad``.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    target = _as_target(target, images.shape[0], images.device)
    inputs = images.detach().clone().requires_grad_(True)
    with _EvalMode(model), torch.enable_grad(), GuidedReLUMode():
        logits = model(inputs)
        selected = logits.gather(1, target[:, None]).sum()
        (grads,) = torch.autograd.grad(selected, inputs)
    return grads


def guided_gradcam(
    model: nn.Module, images: Tensor, target: Tensor | int, method: str = "gradcampp"
) -> Tensor:
    """Guided Grad-CAM(++): ``guided_backprop`` ``(B, 3, H, W)`` times the upsampled map.

    The map (``method``: ``"gradcam"``, ``"gradcampp"`` or ``"cam"``) comes from
    ``model_maps`` on ``model.forward_features`` / ``forward_head`` (closed form when the
    model has ``cam_linear``), in eval mode, resized bilinearly to ``(H, W)``.
    Returns ``(B, 3, H, W)``, detached.
    """
    target = _as_target(target, images.shape[0], images.device)
    guided = guided_backprop(model, images, target)
    with _EvalMode(model), torch.enable_grad():
        # Detached leaf: the maps work even when the parameters are frozen.
        acts = model.forward_features(images.detach()).detach().requires_grad_(True)
        logits = model.forward_head(acts)
        maps = model_maps(model, logits, acts, target, method).detach()
    upsampled = resize_maps(maps, images.shape[-2:]).to(guided.dtype)
    return guided * upsampled[:, None]


# --------------------------------------------------------------------------- overlay
def _image_hwc(image: Tensor | np.ndarray) -> np.ndarray:
    """``(3, H, W)`` tensor in [0, 1] / uint8, or ``(H, W, 3)`` array -> float ``(H, W, 3)``."""
    if isinstance(image, Tensor):
        image = image.detach().cpu()
        if image.dim() == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    image = np.asarray(image)
    scale = 255.0 if image.dtype == np.uint8 else 1.0
    image = image.astype(np.float64) / scale
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"image must be (3, H, W) or (H, W, 3), got shape {image.shape}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.clip(image, 0.0, 1.0)


def overlay(
    image: Tensor | np.ndarray,
    cam: Tensor | np.ndarray,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> np.ndarray:
    """Blend an image with the colour-mapped explanation map.

    ``image``: ``(3, H, W)`` float tensor in ``[0, 1]`` (uint8 accepted) or an ``(H, W, 3)``
    uint8 / float numpy array. ``cam``: ``(h, w)`` map, min-max normalised and resized
    bilinearly to ``(H, W)``. Returns ``(H, W, 3)`` uint8 RGB:
    ``(1 - alpha) * image + alpha * cmap(map)``.
    """
    from matplotlib import colormaps  # lazy: keep matplotlib out of the training imports

    rgb = _image_hwc(image)
    cam = cam.detach().cpu() if isinstance(cam, Tensor) else torch.as_tensor(np.asarray(cam))
    if cam.dim() != 2:
        raise ValueError(f"cam must be one (h, w) map, got shape {tuple(cam.shape)}")
    cam = cam.to(torch.float64)[None]
    heat = normalize_maps(resize_maps(cam, rgb.shape[:2]))[0].numpy()
    colours = colormaps[cmap](heat)[..., :3]
    blended = (1.0 - alpha) * rgb + alpha * colours
    return np.round(np.clip(blended, 0.0, 1.0) * 255.0).astype(np.uint8)


__all__ = [
    "GuidedReLU",
    "GuidedReLUMode",
    "denormalize",
    "guided_backprop",
    "guided_gradcam",
    "normalize_maps",
    "overlay",
    "resize_maps",
]
