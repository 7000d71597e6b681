"""Judging and showing explanations (Grad-CAM++ §4, docs/method.md §4): faithfulness, agreement, pictures, reports.

- :mod:`distill.evaluation.faithfulness`: batched metric functions and their accumulator;
- :mod:`distill.evaluation.report`: the markdown reports and the multirun summary;
- :mod:`distill.evaluation.grid`: the picture grid;
- :mod:`distill.evaluation.runner`: what ``scripts/evaluate.py`` and ``scripts/visualize.py``
  share (loading a checkpoint, its teacher and data back; :func:`evaluate`, :func:`visualize`).
"""

from __future__ import annotations

import importlib
from typing import Any

# Re-exported lazily (PEP 562), so `scripts/summarize.py` does not pay for importing torch.
_EXPORTS = {
    "CONVENTIONS": "faithfulness",
    "SIMILARITY_TARGETS": "faithfulness",
    "ScoreAccumulator": "faithfulness",
    "evaluate_batch": "faithfulness",
    "explanation_images": "faithfulness",
    "faithfulness_scores": "faithfulness",
    "TARGETS": "grid",
    "explanation_grid": "grid",
    "figure_array": "grid",
    "save_figure": "grid",
    "evaluation_markdown": "report",
    "summarize_multirun": "report",
    "evaluate": "runner",
    "visualize": "runner",
    "run_script": "runner",
    "load_model": "runner",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"distill.evaluation.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'distill.evaluation' has no attribute '{name}'")


__all__ = sorted(_EXPORTS)  # noqa: F822 (resolved lazily by __getattr__)
