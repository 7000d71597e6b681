"""Lightning callbacks: epoch timing and explanation panels."""

from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger

from distill.labels import model_label


class EpochTimer(pl.Callback):
    """Logs the wall-clock seconds of every training epoch as ``time/epoch_s`` (of a resumed
    epoch's part since the resume: a mid-epoch restart calls no ``on_train_epoch_start``)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("time/epoch_s", time.perf_counter() - self._start)


class EpochSeeding(pl.Callback):
    """Reseed torch, numpy and ``random`` with ``distill.data.seeding.epoch_seed(seed, epoch)`` at
    every training epoch start (the seed the training loaders' order is drawn from).

    Each epoch's shuffling and augmentation then depend only on the seed and the epoch, so a
    run resumed from an end-of-epoch checkpoint replays the interrupted epoch exactly.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from distill.data.seeding import epoch_seed

        pl.seed_everything(epoch_seed(self.seed, trainer.current_epoch), workers=True, verbose=False)


class ExplanationPanel(pl.Callback):
    """Every ``every_n_epochs`` (and at the last epoch), a grid of fixed validation images with
    the maps of the module's networks (``pl_module.networks()``: teacher and student when
    distilling, else the one network trained): to W&B (``val/explanations``) and as PNGs in ``out_dir``.

    The images are the first ``num_images`` (default: one per class, up to :attr:`MAX_ROWS`) of the
    validation set in its class-interleaved order (``BaseDataModule.validation_images``: one image
    per class before any class repeats), the same at every epoch. A colour bar gives the maps'
    scale. The grid is :mod:`distill.evaluation.grid`'s (as ``scripts/visualize.py``):
    one row per image, titled columns (:meth:`columns`: image | teacher map | student map), the
    label above the image and each model's prediction above its map (green when right),
    ``cell_px`` pixels per cell. ``target="label"`` explains the label (as the loss does),
    ``"pred"`` each model's own top-1 class.
    """

    MAX_ROWS = 20  # with num_images=None: one image per class, for up to this many classes

    def __init__(self, method: str, every_n_epochs: int = 10, num_images: int | None = None,
                 out_dir: str | Path | None = None, cell_px: int = 128, target: str = "label",
                 single_network: bool = False) -> None:
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.method = method
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.cell_px = int(cell_px)
        self.target = target
        self.single_network = single_network  # also panels of a network trained alone (stage=teacher|baseline)
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None

    def columns(self, pl_module: pl.LightningModule) -> list[tuple[str, str]]:
        """The map columns after the image, as ``(role, method)`` (see ``distill.evaluation.grid``):
        one per network of the module, the teacher first."""
        return [(role, self.method) for role in ("teacher", "student") if role in pl_module.networks()]

    @staticmethod
    def labels_of(pl_module: pl.LightningModule) -> dict[str, str]:
        """``role -> model label`` (``distill.labels``) of the module's networks, from the build
        specs it records (``teacher`` / ``student``, or ``model`` for a network trained alone)."""
        hparams = getattr(pl_module, "hparams", None) or {}
        specs = {role: hparams.get(role) or hparams.get("model") for role in pl_module.networks()}
        return {role: model_label(spec) for role, spec in specs.items() if isinstance(spec, dict)}

    def rows(self, datamodule) -> int:
        """``num_images``, or without it one per class of the data (at most :attr:`MAX_ROWS`)."""
        if self.num_images is not None:
            return int(self.num_images)
        return min(int(getattr(datamodule, "num_classes", None) or 8), self.MAX_ROWS)

    def pick_images(self, trainer: pl.Trainer) -> None:
        """Keep the first :meth:`rows` images of the validation set's class-interleaved order (one
        image per class before any class repeats; with ``data.shortcut``, stamped with a conflicting
        cue: ``BaseDataModule.panel_images``)."""
        datamodule = trainer.datamodule
        dataset = getattr(datamodule, "panel_images", datamodule.validation_images)()
        items = [dataset[i] for i in range(min(self.rows(datamodule), len(dataset)))]
        self.images = torch.stack([torch.as_tensor(item[0]) for item in items])
        self.labels = torch.stack([torch.as_tensor(item[1]) for item in items])  # (N,) or multi-hot (N, C)

    def _due(self, trainer: pl.Trainer) -> bool:
        last = trainer.current_epoch + 1 >= (trainer.max_epochs or 0)
        return (trainer.current_epoch % self.every_n_epochs == 0) or last

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self._due(trainer):
            return
        if len(pl_module.networks()) < 2 and not self.single_network:
            return
        if self.images is None:
            self.pick_images(trainer)
        from distill.evaluation.grid import figure_array, save_figure

        figure = self.render(pl_module, trainer.datamodule)
        labels = self.labels_of(pl_module)
        caption = f"epoch {trainer.current_epoch}: image | " + " | ".join(
            f"{who} {labels.get(who, '')} {m}".replace("  ", " ") for who, m in self.columns(pl_module))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("val/explanations", [figure_array(figure)], step=trainer.global_step,
                                 caption=[caption])
        if self.out_dir is not None:
            save_figure(figure, self.out_dir / f"explanations_epoch{trainer.current_epoch:03d}.png")

    def render(self, pl_module: pl.LightningModule, datamodule):
        """The panel as a matplotlib ``Figure``: ``num_images * cell_px`` by ``(1 + columns) * cell_px`` pixels."""
        from distill.evaluation.grid import explanation_cells, grid_figure, multilabel_cells

        networks = pl_module.networks()
        teacher, student = networks.get("teacher"), networks.get("student", networks.get("teacher"))
        modes = {name: net.training for name, net in networks.items()}
        for net in networks.values():
            net.eval()
        try:
            x, y = self.images.to(pl_module.device), self.labels.to(pl_module.device)
            names = getattr(datamodule, "class_names", None)
            if pl_module.task.multilabel:  # one column per positive class and network
                rows = multilabel_cells(student, x, y, datamodule.mean, datamodule.std,
                                        teacher=teacher if teacher is not student else None,
                                        class_names=names, method=self.method)
            else:
                rows = explanation_cells(student, x, y, datamodule.mean, datamodule.std, teacher=teacher,
                                         class_names=names, target=self.target, columns=self.columns(pl_module),
                                         labels_of=self.labels_of(pl_module))
        finally:
            for name, net in networks.items():
                net.train(modes[name])
        return grid_figure(rows, cell_px=self.cell_px)
