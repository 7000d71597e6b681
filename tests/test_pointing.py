"""The grid pointing game (Böhle et al., CVPR 2021): hand-worked scores, grid sampling, chance level.

The model-level test uses an "oracle" network whose map is known: images of class ``c`` are
one-hot in input channel ``c``; its explained activations are ``A_k = x_k + 0.5 * sum_{j != k} x_j``
(a fixed 1x1 convolution) and its head is global average pooling + the identity. On a grid,
channel ``c`` is 1 inside ``c``'s cell and 0.5 in every other cell, and every method's map for
``c`` is proportional to ``A_c``, so the score is ``1 / (1 + 0.5 (n^2 - 1))`` by hand.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from distill.evaluation.pointing import (
    cell_mass,
    grid_pointing_scores,
    pointing_game,
    pointing_scores,
    sample_grids,
    tile_grids,
)
from distill.explain import inspect_network, use_general_path

METHODS = ("gradcam", "gradcampp", "hirescam", "xgradcam", "layercam")


class Oracle(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.num_classes = classes
        self.mix = nn.Conv2d(classes, classes, 1, bias=False)
        self.fc = nn.Linear(classes, classes, bias=False)
        with torch.no_grad():
            self.mix.weight.copy_((0.5 * torch.ones(classes, classes) + 0.5 * torch.eye(classes))[..., None, None])
            self.fc.weight.copy_(torch.eye(classes))

    def forward_features(self, x):
        return self.mix(x)

    def forward_head(self, a):
        return self.fc(a.mean(dim=(2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def one_hot_images(labels: torch.Tensor, classes: int, size: int = 4) -> torch.Tensor:
    return torch.eye(classes)[labels][:, :, None, None].expand(-1, -1, size, size).contiguous()


# --------------------------------------------------------------------------- the score by hand
def test_score_of_a_hand_worked_map():
    # One 4x4 map, 2x2 cells of 2x2 pixels. Positive mass per cell: [1+2+0+1, 3, 0, 0] -> 4, 3, 0, 0
    # (the -5 is not mass). Explaining cell 0: 4 / 7; cell 1: 3 / 7; cells 2, 3: 0.
    m = torch.tensor([[1.0, 2.0, 3.0, 0.0],
                      [0.0, 1.0, 0.0, -5.0],
                      [0.0, 0.0, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0]])
    maps = m.expand(1, 4, 4, 4)
    torch.testing.assert_close(cell_mass(maps, 2)[0, 0], torch.tensor([4.0, 3.0, 0.0, 0.0]))
    torch.testing.assert_close(pointing_scores(maps, 2), torch.tensor([[4 / 7, 3 / 7, 0.0, 0.0]]))
    # All mass in one cell scores 1 there; an all-zero map scores 0 (no division by zero).
    inside = torch.zeros(1, 2, 6, 6)
    inside[0, :, 4:, 2:4] = 1.0  # cell 7 (row 2, column 1) of a 3x3 grid
    torch.testing.assert_close(pointing_scores(inside, 3, torch.tensor([[7, 0]])), torch.tensor([[1.0, 0.0]]))
    assert pointing_scores(torch.zeros(2, 4, 4, 4), 2).eq(0).all()


@pytest.mark.parametrize("n", [2, 3])
def test_uniform_map_scores_one_over_n_squared(n):
    torch.testing.assert_close(pointing_scores(torch.ones(3, n * n, 2 * n, 2 * n), n),
                               torch.full((3, n * n), 1 / n**2))
    # In expectation, for maps of i.i.d. uniform values: mean over 4,000 maps within 0.005.
    torch.manual_seed(0)
    noise = pointing_scores(torch.rand(4000 // (n * n), n * n, 4 * n, 4 * n), n)
    assert abs(float(noise.mean()) - 1 / n**2) < 0.005
    assert float(noise.std()) > 0.01  # the noise is not constant


def test_tiling_is_row_major():
    cells = torch.arange(9.0).reshape(1, 9, 1, 1, 1).expand(1, 9, 1, 2, 3)
    grid = tile_grids(cells, 3)
    assert grid.shape == (1, 1, 6, 9)
    for k in range(9):
        r, c = divmod(k, 3)
        assert (grid[0, 0, 2 * r : 2 * r + 2, 3 * c : 3 * c + 3] == k).all()


# --------------------------------------------------------------------------- grids
def test_grids_never_repeat_a_class_and_use_eligible_images_only():
    torch.manual_seed(1)
    labels = torch.randint(0, 10, (300,))
    eligible = torch.rand(300) < 0.6
    eligible[labels == 7] = False  # class 7 has no eligible image: never drawn
    grids = sample_grids(labels, eligible, 3, 200, seed=5)
    assert grids.shape == (200, 9)
    assert eligible[grids].all()
    classes = labels[grids]
    assert all(len(set(row.tolist())) == 9 for row in classes)
    assert not (classes == 7).any()
    assert len(set(classes.flatten().tolist())) == 9  # every other class appears
    assert torch.equal(grids, sample_grids(labels, eligible, 3, 200, seed=5))  # seeded
    assert not torch.equal(grids, sample_grids(labels, eligible, 3, 200, seed=6))
    with pytest.raises(ValueError, match="needs 16 distinct classes"):
        sample_grids(labels, eligible, 4, 10)


# --------------------------------------------------------------------------- a model with a known map
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("closed_form", [True, False])
def test_oracle_model_scores_the_hand_computed_value(n, closed_form):
    classes = 9
    model = Oracle(classes).eval()
    labels = torch.arange(classes).repeat(3)
    data = TensorDataset(one_hot_images(labels, classes), labels)
    features = model.forward_features(data.tensors[0][:2]).detach()
    spec = inspect_network(model, data.tensors[0][:2]) if closed_form else use_general_path(model, features)
    assert spec.path == ("linear" if closed_form else "general")
    assert (model(data.tensors[0]).argmax(1) == labels).all()  # every image is classified correctly
    expected = 100.0 / (1 + 0.5 * (n * n - 1))  # 40 % for 2x2, 20 % for 3x3
    result = pointing_game({"": model, "teacher/": model}, data, labels, torch.ones_like(labels, dtype=torch.bool),
                           n, num_grids=5, methods=METHODS, seed=0, grids_per_batch=2)
    assert set(result) == {f"{p}pointing_game_{n}x{n}/{m}_pct" for p in ("", "teacher/") for m in METHODS}
    for key, value in result.items():
        assert value == pytest.approx(expected, abs=1e-4), key


def test_maps_that_do_not_split_into_cells_are_upsampled():
    # 2x2 grid of 3x3 images, features pooled to 3x3 (not divisible by 2): upsampled to 6x6.
    class Pooled(Oracle):
        def forward_features(self, x):
            return nn.functional.adaptive_avg_pool2d(self.mix(x), 3)

    model = Pooled(4).eval()
    labels = torch.tensor([[0, 1, 2, 3]])
    grids = tile_grids(one_hot_images(labels[0], 4, size=3)[None], 2)
    scores = grid_pointing_scores(model, grids, labels, 2, ("gradcam",))["gradcam"]
    assert scores.shape == (1, 4) and (scores > 0.25).all() and (scores < 0.4).all()


# --------------------------------------------------------------------------- scripts/evaluate.py
def test_evaluate_plays_the_pointing_game_on_the_first_batches(tmp_path, monkeypatch):
    """``limit_batches=2 pointing_game.grid=2`` (the README's command): the game draws its grids from
    the images the two batches judged, ``dataset[i]`` being the ``i``-th of them."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from distill.evaluation import runner
    from distill.models import build_model
    from tests.support import CONFIG_DIR, compose_config

    train_cfg = compose_config(tmp_path, ["experiment=smoke"])
    checkpoint = tmp_path / "student.ckpt"
    state = {f"model.{k}": v for k, v in build_model("wrn16_1", 10).state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {
        "model_name": "wrn16_1", "num_classes": 10, "stage": "baseline",
        "config": OmegaConf.to_container(train_cfg, resolve=True)}}, checkpoint)
    played = {}

    def game(session, dataset, labels, correct, settings, seed, missing=None):
        played.update(labels=labels, dataset_labels=torch.as_tensor([int(dataset[i][1]) for i in range(len(labels))]))
        return {"pointing_game_2x2/gradcam_pct": 50.0}

    monkeypatch.setattr(runner, "_pointing_game", game)
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("evaluate", overrides=[f"checkpoint={checkpoint}", "limit_batches=2", "batch_size=16",
                                             "pointing_game.grid=2", "progress_bar=false", f"output_dir={tmp_path}",
                                             "device=cpu"])
    result = runner.evaluate(cfg)
    assert result["metrics"]["num_images"] == 32 and result["metrics"]["pointing_game_2x2/gradcam_pct"] == 50.0
    assert len(played["labels"]) == 32 and torch.equal(played["labels"].cpu(), played["dataset_labels"])
