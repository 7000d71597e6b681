"""Faithfulness of explanations and teacher-student agreement (Grad-CAM++ §4, docs/method.md §4), batched.

Everything here works on whole batches: no Python loop over samples, no ``.item()`` /
``.cpu()`` and no branching on tensor values, so a batch stays on its device from the image to
the per-sample scores; :class:`ScoreAccumulator` (torchmetrics ``SumMetric``s) averages them
over the test set and synchronises with the host once, in ``compute()``.

Conventions (also written into every evaluation JSON, see :data:`CONVENTIONS`):

- **Explained class** ``c``: the model's own top-1 prediction on the full image.
- ``Y^c``, ``O^c``: softmax probabilities of ``c`` on the full image and on ``E^c``.
- **Explanation image** ``E^c = L^c_01 * I``. ``L^c`` is upsampled bilinearly to the image size
  and min-max scaled to ``[0, 1]`` per map (a constant map, e.g. all zero, becomes all zero).
  ``I`` is the image in *pixel space*: the loader's normalised tensor is de-normalised first
  (``x * std + mean``, no clamping, so it is the exact inverse), multiplied by the map, and
  ``E`` is normalised again (``(E - mean) / std``) before it goes through the network. A pixel
  the map switches off thus becomes black, as in the Grad-CAM++ paper; multiplying the
  normalised tensor instead would turn it into the dataset's mean colour.
- **Average Drop %** ``= 100 * mean(max(0, Y - O) / Y)`` (lower is better).
- **Increase in Confidence %** ``= 100 * mean(1[Y < O])``, strict (higher is better).
- **Win % (A vs B)** ``= 100 * mean(1[drop_A < drop_B] + 0.5 * 1[drop_A == drop_B])`` on the
  clipped per-image drops ``max(0, Y - O) / Y`` that Average Drop averages. Ties (most often
  both 0: both explanation images raised the confidence) count half for each method, so
  ``Win(A vs B) + Win(B vs A) = 100``.
- **Agreement** = share of images where student and teacher have the same top-1 class.
- **Map similarity** = mean cosine of the flattened Grad-CAM++ maps of teacher and student
  (the student's map resized bilinearly to the teacher's size when they differ), both
  explaining the same class: by default the image's label (the class the paper's
  explanation loss matches), optionally the student's or the teacher's top-1. An all-zero
  map has no direction: its cosine is undefined (NaN) and the pair is left out of the mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics import SumMetric

from distill.explain import EVAL_METHOD, head_maps, leaf_features
from distill.explain.visual import normalize_maps, resize_maps
from distill.losses import map_cosine

METHOD_PAIR = ("gradcam", "gradcampp")  # Win % is reported for the second over the first
SIMILARITY_TARGETS = ("label", "student_pred", "teacher_pred")
UNITLESS = ("map_cosine",)  # every other score is reported as a percentage

CONVENTIONS = {
    "explained_class": "the model's own top-1 prediction on the full image",
    "explanation_image": "E = minmax01(bilinear_upsample(map)) * (x * std + mean), then (E - mean) / std",
    "average_drop_pct": "100 * mean(max(0, Y - O) / Y); Y, O = softmax of the explained class on x and E",
    "increase_in_confidence_pct": "100 * mean(1[Y < O]) (strict)",
    "win_pct": "100 * mean(1[drop_gradcampp < drop_gradcam] + 0.5 * 1[equal]) on the clipped drops; "
               "ties count half",
    "agreement_pct": "100 * mean(1[argmax student == argmax teacher])",
    "map_cosine": "mean cosine of teacher and student Grad-CAM++ maps for the same class "
                  "(similarity_target), student map resized to the teacher's; pairs with an all-zero map left out",
    "pointing_game_pct": "100 * mean over cells of n x n grids of distinct classes (images the teacher, else the "
                         "model, classifies correctly) of positive map mass in the explained class's cell / "
                         "positive mass over the grid (Böhle et al., CVPR 2021); all-zero map -> 0",
}


# --------------------------------------------------------------------------- explanation images
def _channel_stats(values: Sequence[float] | Tensor | None, like: Tensor) -> Tensor | None:
    if values is None:
        return None
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(-1, 1, 1)


def explanation_images(
    images: Tensor,
    maps: Tensor,
    mean: Sequence[float] | Tensor | None = None,
    std: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """``E = minmax01(upsampled map) * I`` for every (image, map) pair.

    ``images`` ``(B, C, H, W)``: normalised with ``mean``/``std`` (per channel), or in pixel
    space when both are ``None``. ``maps`` ``(B, h, w)`` -> ``(B, C, H, W)``, or
    ``(B, T, h, w)`` -> ``(B, T, C, H, W)``. The product is taken in pixel space and the result
    is normalised like the input, so it can be fed to the same network.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if maps.dim() not in (3, 4) or maps.shape[0] != images.shape[0]:
        raise ValueError(f"maps must be (B, h, w) or (B, T, h, w) with B = {images.shape[0]}, "
                         f"got shape {tuple(maps.shape)}")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (normalised images) or neither (pixel space)")
    mean_t, std_t = _channel_stats(mean, images), _channel_stats(std, images)
    pixels = images if mean_t is None else images * std_t + mean_t
    weights = normalize_maps(resize_maps(maps, images.shape[-2:])).to(images.dtype)
    if maps.dim() == 4:
        pixels = pixels[:, None]  # (B, 1, C, H, W) against (B, T, 1, H, W)
    explained = pixels * weights.unsqueeze(-3)
    return explained if mean_t is None else (explained - mean_t) / std_t


# --------------------------------------------------------------------------- per-image scores
def class_probability(logits: Tensor, target: Tensor) -> Tensor:
    """Softmax probability of class ``target`` ``(B,)``: ``(B, C) -> (B,)``, in float32 or wider."""
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)
    return probs.gather(1, target.long()[:, None])[:, 0]


def relative_drop(full: Tensor, explained: Tensor) -> Tensor:
    """Per image ``max(0, Y - O) / Y`` (``(B,)``, in ``[0, 1]``)."""
    return (full - explained).clamp_min(0) / full


def confidence_increase(full: Tensor, explained: Tensor) -> Tensor:
    """Per image ``1[Y < O]`` as float ``(B,)``."""
    return (full < explained).to(full.dtype)


def wins(drop_a: Tensor, drop_b: Tensor) -> Tensor:
    """Per image 1 where A's drop is smaller than B's, 0.5 on a tie, else 0."""
    return (drop_a < drop_b).to(drop_a.dtype) + 0.5 * (drop_a == drop_b).to(drop_a.dtype)


def top1_agreement(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Per image 1.0 where the two top-1 classes are equal."""
    return (student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).float()


# --------------------------------------------------------------------------- running models
def forward_explainable(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """``(features, logits)``: ``leaf_features`` ``(B, K, h, w)`` for ``head_maps``, and the
    logits ``(B, C)`` without a graph. The model is used as it is: put it in eval mode first."""
    features = leaf_features(model, images)
    with torch.no_grad():
        logits = model.forward_head(features)
    return features, logits


def faithfulness_scores(
    model: nn.Module,
    images: Tensor,
    mean: Sequence[float] | Tensor | None = None,
    std: Sequence[float] | Tensor | None = None,
    methods: Sequence[str] = METHOD_PAIR,
    outputs: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Per-image Average Drop / Increase in Confidence terms of each method, and Win.

    The explained class is the model's top-1. One forward pass scores the explanation
    images of all methods at once (``len(methods) * B`` images). ``outputs`` are
    ``forward_explainable(model, images)`` when already computed.

    Returns ``(B,)`` tensors, fractions in ``[0, 1]``: ``<method>/average_drop`` (the clipped
    relative drop), ``<method>/increase_in_confidence`` and, when ``methods`` is the pair
    ``(gradcam, gradcampp)``, ``win_gradcampp_vs_gradcam``.
    """
    features, logits = outputs if outputs is not None else forward_explainable(model, images)
    pred = logits.argmax(dim=1)
    full = class_probability(logits, pred)
    maps = torch.stack([head_maps(model, features, pred, m) for m in methods], dim=1)  # (B, M, h, w)
    explained = explanation_images(images, maps, mean, std)  # (B, M, C, H, W)
    with torch.no_grad():
        explained_logits = model(explained.flatten(0, 1)).reshape(len(images), len(methods), -1)
    scores: dict[str, Tensor] = {}
    drops = {}
    for i, method in enumerate(methods):
        out = class_probability(explained_logits[:, i], pred)
        drops[method] = relative_drop(full, out)
        scores[f"{method}/average_drop"] = drops[method]
        scores[f"{method}/increase_in_confidence"] = confidence_increase(full, out)
    if tuple(methods) == METHOD_PAIR:
        scores["win_gradcampp_vs_gradcam"] = wins(drops["gradcampp"], drops["gradcam"])
    return scores


def _similarity_target(mode: str, labels: Tensor, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    if mode == "label":
        return labels
    if mode == "student_pred":
        return student_logits.argmax(dim=1)
    if mode == "teacher_pred":
        return teacher_logits.argmax(dim=1)
    raise ValueError(f"similarity target '{mode}' is unknown; choose one of {SIMILARITY_TARGETS}")


def evaluate_batch(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    mean: Sequence[float] | Tensor | None = None,
    std: Sequence[float] | Tensor | None = None,
    teacher: nn.Module | None = None,
    similarity_target: str = "label",
    explain_teacher: bool = False,
    similarity_method: str = EVAL_METHOD,
) -> dict[str, Tensor]:
    """All per-image scores of one batch, as ``(B,)`` float tensors on the batch's device.

    Keys: ``accuracy``, the :func:`faithfulness_scores` of ``model``; with a ``teacher`` also
    ``teacher/accuracy``, ``agreement``, ``map_cosine`` and, if ``explain_teacher``, the
    teacher's faithfulness scores under ``teacher/``. Both models must be in eval mode.
    """
    labels = labels.long()
    features, logits = forward_explainable(model, images)
    scores = {"accuracy": (logits.argmax(dim=1) == labels).float()}
    scores.update(faithfulness_scores(model, images, mean, std, outputs=(features, logits)))
    if teacher is None:
        return scores
    t_features, t_logits = forward_explainable(teacher, images)
    target = _similarity_target(similarity_target, labels, logits, t_logits)
    s_maps = head_maps(model, features, target, similarity_method)
    t_maps = head_maps(teacher, t_features, target, similarity_method)
    scores["teacher/accuracy"] = (t_logits.argmax(dim=1) == labels).float()
    scores["agreement"] = top1_agreement(logits, t_logits)
    scores["map_cosine"] = map_cosine(s_maps, t_maps)  # student resized to the teacher's size
    if explain_teacher:
        teacher_scores = faithfulness_scores(teacher, images, mean, std, outputs=(t_features, t_logits))
        scores.update({f"teacher/{k}": v for k, v in teacher_scores.items()})
    return scores


# --------------------------------------------------------------------------- accumulation
class WeightedMean(nn.Module):
    """``sum(w * v) / sum(w)`` over every update, from two ``SumMetric``s (no NaN check, no
    host sync). Not ``MeanMetric(nan_strategy="disable")``: torchmetrics 1.9 drops the weights
    in that mode (its ``_cast_and_nan_check_input`` replaces them by ones)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = SumMetric(nan_strategy="disable")
        self.weight = SumMetric(nan_strategy="disable")

    def update(self, value: Tensor, weight: Tensor | None = None) -> None:
        """NaN values (undefined, e.g. ``map_cosine`` of an all-zero map) are left out (weight 0)."""
        weight = torch.ones_like(value) if weight is None else weight.to(value.dtype)
        weight = weight * ~value.isnan()
        self.total.update((value.nan_to_num(0.0) * weight).sum())
        self.weight.update(weight.sum())

    def compute(self) -> Tensor:
        """The mean; NaN when nothing was counted."""
        return self.total.compute() / self.weight.compute()


class ScoreAccumulator(nn.Module):
    """Running means of per-image scores (one :class:`WeightedMean` per key, created on first use).

    ``update`` only adds tensors on the device (``nan_strategy="disable"``: no NaN check, which
    would synchronise); ``compute`` returns plain floats: ``<key>_pct = 100 * mean`` for every
    key except the :data:`UNITLESS` ones (``<key> = mean``), and ``num_images``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.means = nn.ModuleDict()
        self.count = SumMetric(nan_strategy="disable")
        self._keys: dict[str, str] = {}  # ModuleDict keys cannot hold "/" -> "__"

    def update(self, scores: dict[str, Tensor | tuple[Tensor, Tensor]]) -> None:
        """``scores``: ``{key: (N,) values}`` or ``{key: ((N,) values, (N,) weights)}`` (weighted
        mean, e.g. weight 0 for padding). ``num_images`` counts the first entry's ``N``."""
        device = None
        for key, value in scores.items():
            value, weight = value if isinstance(value, tuple) else (value, None)
            name = key.replace("/", "__").replace(".", "_")
            if name not in self.means:
                self.means[name] = WeightedMean().to(value.device)
                self._keys[key] = name
            self.means[name].update(value, weight)
            device = value.device
        if device is not None:
            self.count = self.count.to(device)
            first = next(iter(scores.values()))
            first = first[0] if isinstance(first, tuple) else first
            self.count.update(torch.full((), first.shape[0], dtype=torch.float32, device=device))

    def compute(self) -> dict[str, float]:
        result: dict[str, float] = {}
        for key, name in self._keys.items():
            value = float(self.means[name].compute())
            if math.isnan(value):  # nothing defined was counted (e.g. every map all zero): no number
                continue
            if key.split("/")[-1] in UNITLESS:
                result[key] = value
            else:
                result[f"{key}_pct"] = 100.0 * value
        result["num_images"] = int(self.count.compute()) if self._keys else 0
        return result


__all__ = [
    "CONVENTIONS",
    "METHOD_PAIR",
    "SIMILARITY_TARGETS",
    "ScoreAccumulator",
    "class_probability",
    "confidence_increase",
    "evaluate_batch",
    "explanation_images",
    "faithfulness_scores",
    "forward_explainable",
    "relative_drop",
    "top1_agreement",
    "wins",
]
