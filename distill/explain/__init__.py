"""Explanation maps: pure tensor functions (``maps``) and the maps of a network (``network``)."""

from distill.explain.maps import (
    METHODS,
    class_gradients,
    closed_form_weights,
    explanation_maps,
    gradcam_weights,
    gradcampp_alpha,
    gradcampp_weights,
    gradient_maps,
    hirescam_maps,
    layercam_maps,
    weighted_maps,
    xgradcam_weights,
)
from distill.explain.network import explain_network, head_maps, leaf_features, model_maps, network_maps
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
    "explain_network",
    "explanation_maps",
    "gradcam_weights",
    "gradcampp_alpha",
    "gradcampp_weights",
    "gradient_maps",
    "guided_backprop",
    "guided_gradcam",
    "head_maps",
    "hirescam_maps",
    "layercam_maps",
    "leaf_features",
    "model_maps",
    "network_maps",
    "normalize_maps",
    "overlay",
    "resize_maps",
    "weighted_maps",
    "xgradcam_weights",
]
