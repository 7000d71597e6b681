"""distill: explanation-guided knowledge distillation (Grad-CAM / Grad-CAM++ maps as a loss),
with PyTorch Lightning modules, Hydra config groups and Weights & Biases tracking."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("distill")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"
