"""Distillation losses: Hinton KD, decoupled KD, attention transfer, and the explanation loss."""

from distill.losses.attention import attention_map, attention_transfer
from distill.losses.dkd import decoupled_kd, dkd_parts, dkd_warmup
from distill.losses.explain import DISTANCES, MAP_NORM_EPS, explain_loss, map_cosine, match_size
from distill.losses.kd import hinton_kd
from distill.losses.multilabel import masked_bce, multilabel_kd

__all__ = [
    "DISTANCES",
    "MAP_NORM_EPS",
    "attention_map",
    "attention_transfer",
    "decoupled_kd",
    "dkd_parts",
    "dkd_warmup",
    "explain_loss",
    "hinton_kd",
    "map_cosine",
    "masked_bce",
    "match_size",
    "multilabel_kd",
]
