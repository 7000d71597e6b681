"""Lightning callbacks: epoch timing and explanation panels."""

from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger

from distill.explain import network_maps


class EpochTimer(pl.Callback):
    """Logs the wall-clock seconds of every training epoch as ``time/epoch_s``."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("time/epoch_s", time.perf_counter() - self._start)


class EpochSeeding(pl.Callback):
    """Reseed torch, numpy and ``random`` from ``(seed, epoch)`` at every training epoch start.

    Each epoch's shuffling and augmentation then depend only on the seed and the epoch, so a
    run resumed from an end-of-epoch checkpoint replays the interrupted epoch exactly.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl.seed_everything(self.seed * 1000 + trainer.current_epoch, workers=True, verbose=False)


class ExplanationPanel(pl.Callback):
    """Every ``every_n_epochs``, a panel of fixed validation images with the teacher's and the
    student's maps side by side: to W&B (``val/explanations``), or as PNGs in ``out_dir``.

    The images are the first ``num_images`` of the first validation batch, kept from the first
    validation epoch on, so panels of different epochs show the same images.
    """

    def __init__(self, every_n_epochs: int = 10, num_images: int = 8, method: str = "gradcampp",
                 out_dir: str | Path | None = None) -> None:
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.method = method
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.images is None and batch_idx == 0:
            x, y = batch[0], batch[1]  # VOC evaluation batches also carry boxes
            self.images, self.labels = x[: self.num_images].detach().cpu(), y[: self.num_images].detach().cpu()

    def _due(self, trainer: pl.Trainer) -> bool:
        last = trainer.current_epoch + 1 >= (trainer.max_epochs or 0)
        return (trainer.current_epoch % self.every_n_epochs == 0) or last

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.images is None or trainer.sanity_checking or not trainer.is_global_zero or not self._due(trainer):
            return
        panel = self.render(pl_module, trainer.datamodule)
        caption = f"epoch {trainer.current_epoch}: image | teacher {self.method} | student {self.method}"
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("val/explanations", [panel], step=trainer.global_step, caption=[caption])
        if self.out_dir is not None:
            from PIL import Image

            self.out_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(panel).save(self.out_dir / f"explanations_epoch{trainer.current_epoch:03d}.png")

    @torch.no_grad()
    def render(self, pl_module: pl.LightningModule, datamodule) -> np.ndarray:
        """``(N*H, 3*W, 3)`` uint8: rows of image | teacher overlay | student overlay. Multi-hot
        labels ``(N, C)`` (VOC): a titled grid, one column per positive class and model."""
        from distill.explain.visual import denormalize, overlay

        x = self.images.to(pl_module.device)
        y = self.labels.to(pl_module.device)
        if y.dim() == 2:
            return self._render_multilabel(pl_module, datamodule, x, y)
        columns = [denormalize(x, datamodule.mean, datamodule.std).clamp(0, 1)]
        rgb = [(img.permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8) for img in columns[0]]
        rows = []
        maps = [self._maps(model, x, y) for model in (pl_module.teacher, pl_module.model)]
        for i, img in enumerate(columns[0]):
            rows.append(np.concatenate([rgb[i]] + [overlay(img.cpu(), m[i].cpu()) for m in maps], axis=1))
        return np.concatenate(rows, axis=0)

    def _maps(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()
        maps = network_maps(model, x, y, self.method)
        model.train(was_training)
        return maps

    def _render_multilabel(self, pl_module: pl.LightningModule, datamodule, x: torch.Tensor,
                           y: torch.Tensor) -> np.ndarray:
        from distill.evaluation.grid import figure_array, grid_figure, multilabel_cells

        models = (pl_module.teacher, pl_module.model)
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        try:
            rows = multilabel_cells(pl_module.model, x, y, datamodule.mean, datamodule.std, teacher=pl_module.teacher,
                                    class_names=getattr(datamodule, "class_names", None), method=self.method)
        finally:
            for m, mode in zip(models, modes, strict=True):
                m.train(mode)
        return figure_array(grid_figure(rows, cell_px=max(96, x.shape[-1]), dpi=100))
