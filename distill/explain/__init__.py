"""Explanation maps as pure tensor functions (SPEC §1)."""

from distill.explain.maps import (
    METHODS,
    class_gradients,
    closed_form_weights,
    explanation_maps,
    gradcam_weights,
    gradcampp_alpha,
    gradcampp_weights,
    head_maps,
    leaf_features,
    model_maps,
    network_maps,
    weighted_maps,
)
from distill.explain.visual import (
    GuidedReLUMode,
    denormalize,
    guided_backprop,
    guided_gradcam,
    normalize_maps,
    overlay,
    resize_maps,
)

__all__ = [
    "METHODS",
    "GuidedReLUMode",
    "class_gradients",
    "closed_form_weights",
    "denormalize",
    "explanation_maps",
    "gradcam_weights",
    "gradcampp_alpha",
    "gradcampp_weights",
    "guided_backprop",
    "guided_gradcam",
    "head_maps",
    "leaf_features",
    "model_maps",
    "network_maps",
    "normalize_maps",
    "overlay",
    "resize_maps",
    "weighted_maps",
]
