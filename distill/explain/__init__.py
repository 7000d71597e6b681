"""Explanation maps as pure tensor functions (SPEC §1)."""

from distill.explain.maps import (
    METHODS,
    class_gradients,
    closed_form_weights,
    explanation_maps,
    gradcam_weights,
    gradcampp_alpha,
    gradcampp_weights,
    model_maps,
    weighted_maps,
)

__all__ = [
    "METHODS",
    "class_gradients",
    "closed_form_weights",
    "explanation_maps",
    "gradcam_weights",
    "gradcampp_alpha",
    "gradcampp_weights",
    "model_maps",
    "weighted_maps",
]
