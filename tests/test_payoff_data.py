"""Transfer set, few-shot and shortcut distillation (docs/payoff_settings.md): the ``data.per_class``
draw, the class-coded cue and its conflicting-cue test set, the cue's share of a map's mass, and
the teacher's data (full and clean; another folder; an explicit checkpoint trained on other data).
Tiny data in the real formats, CPU, a few seconds each (one slow end-to-end run)."""

from __future__ import annotations

import colorsys
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from distill.data import CIFAR100DataModule, ImageFolderDataModule, ImageNetDataModule, SyntheticDataModule
from distill.data.base import dataset_labels
from distill.data.shortcut import Shortcut
from distill.errors import CheckpointError, ConfigError
from distill.explain import box_mass_share
from tests.support import PooledLinear, run_train
from tests.tiny_datasets import write_cifar100, write_image_tree

CLASSES = ["cat", "dog", "eel"]
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # the image folders' defaults, written out


def folder(root: Path, n_train: int = 6, classes=CLASSES, seed: int = 0) -> Path:
    write_image_tree(root, classes=classes, eval_split="test", n_train=n_train, n_eval=3, size=(32, 32),
                     suffix=".jpg", seed=seed)
    return root


def folder_dm(root: Path, **kw) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(root, **{"batch_size": 4, "num_workers": 0, **kw})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def train_labels(dm) -> list[int]:
    """The class of every training image, read from the files' own labels (not the DataModule's view)."""
    base = dm.train_set
    while hasattr(base, "dataset") and not hasattr(base, "indices"):  # the shortcut wrapper
        base = base.dataset
    return [base.base.targets[i] for i in base.indices]


def colour(c: int, num_classes: int) -> torch.Tensor:
    """Class ``c``'s cue colour normalised as the image folders normalise (hue c / C, written out here)."""
    return (torch.tensor(colorsys.hsv_to_rgb(c / num_classes, 1.0, 1.0)) - torch.tensor(MEAN)) / torch.tensor(STD)


# ------------------------------------------------------------------------------- few-shot
def test_per_class_draws_exactly_n_per_class_the_same_for_every_seed(tmp_path):
    root = folder(tmp_path, n_train=6)
    dm = folder_dm(root, per_class=2, seed=0)
    assert Counter(train_labels(dm)) == {0: 2, 1: 2, 2: 2}
    assert dm.train_set.indices == folder_dm(root, per_class=2, seed=7).train_set.indices  # training seed: same
    other = folder_dm(root, per_class=2, subset_seed=1)
    assert other.train_set.indices != dm.train_set.indices and Counter(train_labels(other)) == {0: 2, 1: 2, 2: 2}
    assert Counter(dataset_labels(folder_dm(root, per_class=6).train_set)) == {0: 6, 1: 6, 2: 6}  # all of them


def test_per_class_with_a_validation_split_draws_from_subset_seed_only(tmp_path):
    root = folder(tmp_path, n_train=8)
    a, b = folder_dm(root, per_class=3, val_split=0.25, seed=0), folder_dm(root, per_class=3, val_split=0.25, seed=5)
    assert a.train_set.indices == b.train_set.indices and a.val_set.indices == b.val_set.indices
    assert Counter(train_labels(a)) == {0: 3, 1: 3, 2: 3}
    assert not set(a.train_set.indices) & set(a.val_set.indices)


def test_per_class_on_imagenet_layout_cifar_on_device_and_synthetic(tmp_path, monkeypatch):
    write_image_tree(tmp_path / "inet", n_train=5)  # ImageNet layout: train/ and val/ <wnid> folders
    inet = ImageNetDataModule(tmp_path / "inet", image_size=32, resize=32, per_class=3, batch_size=2, num_workers=0)
    inet.setup("fit")
    assert Counter(dataset_labels(inet.train_set)) == {0: 3, 1: 3, 2: 3}
    dev = folder_dm(folder(tmp_path / "dev", n_train=6), per_class=4, on_device=True)  # uint8 images on the device
    assert Counter(dev.train_set.labels.tolist()) == {0: 4, 1: 4, 2: 4}
    syn = SyntheticDataModule(num_train=60, num_val=10, image_size=8, num_classes=5, per_class=7)
    syn.setup("fit")
    assert Counter(dataset_labels(syn.train_set)) == {c: 7 for c in range(5)}
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)  # tiny files: no md5 match
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    raw = write_cifar100(tmp_path / "c100", n_train=2000)
    smallest = min(Counter(raw["train_y"].tolist()).get(c, 0) for c in range(100))
    assert smallest >= 1
    c100 = CIFAR100DataModule(tmp_path / "c100", download=False, per_class=smallest, num_workers=0)
    c100.setup("fit")
    picked = Counter(raw["train_y"][c100.train_set.indices].tolist())  # the pickles' own labels
    assert picked == {c: smallest for c in range(100)}
    c100 = CIFAR100DataModule(tmp_path / "c100", download=False, per_class=smallest + 1, num_workers=0)
    with pytest.raises(ConfigError, match=rf"data.per_class={smallest + 1} exceeds the {smallest} training images "
                                          r"of \w+, the smallest class") as info:
        c100.setup("fit")
    assert "\n" not in str(info.value)


def test_per_class_refusals_are_one_line(tmp_path):
    root = folder(tmp_path, n_train=3)
    with pytest.raises(ConfigError, match="data.per_class=4 exceeds the 3 training images of cat, the smallest"):
        folder_dm(root, per_class=4)
    with pytest.raises(ConfigError, match="per_class and data.train_subset"):
        ImageFolderDataModule(root, per_class=2, train_subset=5)
    from distill.data import VOC2007DataModule

    with pytest.raises(ConfigError, match="multi-label"):
        VOC2007DataModule(tmp_path, download=False, per_class=2)
    with pytest.raises(ConfigError, match=r"data.shortcut.p must be a probability"):
        ImageFolderDataModule(root, shortcut={"p": 1.5})


# ------------------------------------------------------------------------------- the cue
def test_stamp_draws_the_class_colour_in_the_corner_only_where_present():
    cue = Shortcut(p=1.0, size=4, num_classes=4, image_size=(16, 16), mean=(0.0,) * 3, std=(1.0,) * 3)
    assert cue.side == 2  # 4 px at 32 px -> 2 px at 16 px
    images = torch.randn(3, 3, 16, 16)
    out = cue.stamp(images, torch.tensor([1, 3, 2]), torch.tensor([True, True, False]))
    hues = {1: (0.5, 1.0, 0.0), 3: (0.5, 0.0, 1.0)}  # hue 1/4 and 3/4 at full saturation and value, by hand
    for b, c in ((0, 1), (1, 3)):
        assert torch.equal(out[b, :, :2, :2], torch.tensor(hues[c])[:, None, None].expand(3, 2, 2))
    assert torch.equal(out[2], images[2])  # not present: untouched
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[:2, :2] = False
    assert torch.equal(out[:, :, outside], images[:, :, outside])
    assert torch.equal(cue.box(), torch.tensor([0, 0, 2, 2]))
    assert Shortcut(p=1, size=4, num_classes=2, image_size=(224, 224), mean=(0,) * 3, std=(1,) * 3).side == 28


def test_presence_is_fixed_per_image_by_subset_seed():
    make = lambda seed, p=0.3: Shortcut(p=p, size=4, num_classes=10, image_size=(32, 32),  # noqa: E731
                                        mean=(0,) * 3, std=(1,) * 3, seed=seed)
    present = make(0).present(20_000)
    assert abs(present.float().mean().item() - 0.3) < 0.015
    assert torch.equal(present, make(0).present(20_000)) and not torch.equal(present, make(1).present(20_000))
    labels = torch.arange(1000) % 10
    cue = make(0).conflicting(labels)
    assert (cue != labels).all() and ((cue >= 0) & (cue < 10)).all()
    assert len(set(((cue - labels) % 10).tolist())) == 9  # every other class is used
    assert torch.equal(cue, make(0).conflicting(labels)) and not torch.equal(cue, make(1).conflicting(labels))


def corner_is(x: torch.Tensor, classes: torch.Tensor, side: int, num_classes: int) -> torch.Tensor:
    """``(B,)`` bool: the image's top-left ``side x side`` square is the colour of ``classes``."""
    want = torch.stack([colour(int(c), num_classes) for c in classes])[:, :, None, None]
    return torch.isclose(x[:, :, :side, :side], want, atol=1e-5).flatten(1).all(dim=1)


@pytest.mark.parametrize("on_device", [False, True])
def test_training_images_carry_the_cue_after_augmentation(tmp_path, on_device):
    dm = folder_dm(folder(tmp_path, n_train=8), shortcut={"p": 1.0, "size": 4}, on_device=on_device, augment=True)
    for x, y in dm.train_dataloader():
        assert corner_is(x, y, 4, 3).all()  # crop and flip came first: the square is whole, in the corner
    half = folder_dm(tmp_path, shortcut={"p": 0.5, "size": 4}, seed=0)
    again = folder_dm(tmp_path, shortcut={"p": 0.5, "size": 4}, seed=3)  # another training seed: same images
    stamped = [bool(corner_is(half.train_set[i][0][None], torch.tensor([half.train_set[i][1]]), 4, 3))
               for i in range(len(half.train_set))]
    assert stamped == [bool(corner_is(again.train_set[i][0][None], torch.tensor([again.train_set[i][1]]), 4, 3))
                       for i in range(len(again.train_set))]
    assert stamped == half.cue.present(24).tolist()
    clean = next(iter(half.val_dataloader()))  # validation stays clean
    assert not corner_is(clean[0], clean[1], 4, 3).any()


def test_conflicting_cue_test_set_and_panel_images(tmp_path):
    dm = folder_dm(folder(tmp_path), shortcut={"p": 0.9, "size": 4}, eval_batch_size=9)
    loaders = dm.test_dataloader()
    assert len(loaders) == 2
    (x, y), (xc, yc, cue, box) = next(iter(loaders[0])), next(iter(loaders[1]))
    assert torch.equal(y, yc) and (cue != y).all() and corner_is(xc, cue, 4, 3).all()
    assert torch.equal(xc[:, :, 4:], x[:, :, 4:]) and torch.equal(xc[:, :, :, 4:], x[:, :, :, 4:])  # elsewhere clean
    assert torch.equal(box, torch.tensor([[0, 0, 4, 4]] * 9))
    again = folder_dm(tmp_path, shortcut={"p": 0.9, "size": 4}, eval_batch_size=9, seed=4)
    def cue_of_image(d) -> dict[str, int]:  # test file -> its cue class, in whatever order a seed reads them
        view = d.conflict_images()
        return {d.test_set.samples[i][0]: int(view.dataset[i][2]) for i in view.indices}

    assert cue_of_image(again) == cue_of_image(dm)  # fixed by subset_seed, not by the training seed
    other = folder_dm(tmp_path, shortcut={"p": 0.9, "size": 4}, subset_seed=1)
    assert cue_of_image(other) != cue_of_image(dm)
    panel = dm.panel_images()
    image, label, panel_cue = panel[0][:3]
    assert panel_cue != label and corner_is(image[None], torch.tensor([panel_cue]), 4, 3).all()
    assert not isinstance(folder_dm(tmp_path).test_dataloader(), list)  # no cue: one clean loader


# ------------------------------------------------------------------------------- the cue's map mass
def test_box_mass_share_hand_worked():
    m = torch.tensor([[[1.0, 2, 0, -3], [3, -1, 0, 0], [0, 0, 4, 0], [0, 0, 0, 0]]])
    # positive mass 1 + 2 + 3 + 4 = 10, of which 1 + 2 + 3 in the top-left 2x2 box
    assert box_mass_share(m, torch.tensor([[0, 0, 2, 2]]), (4, 4)).item() == pytest.approx(0.6)
    # a 2x2 map [[1, 0], [0, 0]] upsampled to 4x4 (bilinear, align_corners=False): each axis samples the
    # source at -0.25, 0.25, 0.75, 1.25 (clamped), weights [1, 0.75, 0.25, 0]: outer product, total 2 * 2
    corner = torch.tensor([[[1.0, 0], [0, 0]]])
    assert box_mass_share(corner, torch.tensor([[0, 0, 2, 2]]), (4, 4)).item() == pytest.approx(1.75 ** 2 / 4)
    flat = torch.full((2, 2, 2), 3.0)  # uniform: the box's share of the area
    shares = box_mass_share(flat, torch.tensor([[0, 0, 2, 2], [2, 4, 8, 8]]), (8, 8))
    torch.testing.assert_close(shares, torch.tensor([4 / 64, 24 / 64]))
    assert box_mass_share(-flat, torch.tensor([[0, 0, 2, 2]] * 2), (8, 8)).tolist() == [0.0, 0.0]  # no mass


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_conflict_test_step_scores_the_cue_independently():
    """``test/cue_follow`` and ``test/cue_map_mass`` of hand-built networks (image = activations, pool +
    linear head), against a float64 computation of Grad-CAM's map ReLU(sum_k W[c, k] A_k) written here."""
    from distill.module import DistillModule, ExplainSettings

    gen = torch.Generator().manual_seed(0)
    w_s, w_t = torch.randn(3, 3, generator=gen), torch.randn(3, 3, generator=gen)
    module = DistillModule(PooledLinear(w_s.tolist()), PooledLinear(w_t.tolist()),
                           explain=ExplainSettings(eval_method="gradcam"))
    x = torch.randn(6, 3, 8, 8, generator=gen)
    y, cue = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([1, 2, 0, 2, 0, 1])
    box = torch.tensor([[0, 0, 3, 3]] * 6)
    module._cue_step((x, y, cue, box))
    for who, w in (("", w_s), ("teacher_", w_t)):
        xd, wd = x.double(), w.double()
        pred = (xd.mean(dim=(2, 3)) @ wd.T).argmax(dim=1)
        maps = torch.einsum("bk,bkhw->bhw", wd[pred], xd).clamp_min(0)
        share = maps[:, :3, :3].sum(dim=(1, 2)) / maps.sum(dim=(1, 2))
        assert module.cue_metrics[f"{who}cue_follow"].compute().item() == pytest.approx((pred == cue).double().mean())
        assert module.cue_metrics[f"{who}cue_map_mass"].compute().item() == pytest.approx(share.mean().item(),
                                                                                           rel=1e-5)


# ------------------------------------------------------------------------------- the teacher's data
def test_teacher_data_is_full_and_clean_and_its_key_ignores_the_student_options(compose, tmp_path):
    from distill.build import identity
    from distill.identity import checkpoint_stem
    from distill.teacher import teacher_config

    plain = compose(["experiment=smoke", "logger=none"])
    assert teacher_config(plain) is plain
    student = compose(["experiment=smoke", "logger=none", "data.per_class=5", "data.shortcut.p=0.9"])
    teacher = teacher_config(student)
    assert teacher.data.per_class is None and teacher.data.shortcut is None
    assert student.data.per_class == 5 and student.data.shortcut.p == 0.9  # the student's untouched
    dm = SyntheticDataModule(num_train=40, num_val=10, image_size=8)

    def stem(cfg, role):
        ident = identity(cfg, role, dm)
        return checkpoint_stem(ident["network"], ident["data"])

    assert stem(teacher, "teacher") == stem(plain, "teacher")  # every few-shot / shortcut row: one teacher
    assert stem(student, "student") != stem(plain, "student")
    other = identity(compose(["experiment=smoke", "data.per_class=5", "data.subset_seed=1"]), "student", dm)["data"]
    assert other["subset_seed"] == 1 and other["per_class"] == 5 and "seed" not in other
    with pytest.raises(ConfigError, match="teacher_data.nope is not a key of data=synthetic"):
        teacher_config(compose(["experiment=smoke", "+teacher_data.nope=1"]))


def test_teacher_data_root_is_another_folder_with_the_same_classes(compose, tmp_path):
    from distill.run import prepare_data, teacher_datamodule

    a, b = folder(tmp_path / "a"), folder(tmp_path / "b", n_train=2, seed=1)
    cfg = compose(["experiment=smoke", "data=image_folder", f"data.root={b}", f"teacher_data.root={a}",
                   "data.batch_size=2"])
    student = prepare_data(cfg)
    teacher_cfg, teacher = teacher_datamodule(cfg, student)
    assert Path(teacher.root) == a and Path(student.root) == b and teacher_cfg.data.root == str(a)
    folder(tmp_path / "c", classes=["cat", "dog", "fox"])
    cfg = compose(["experiment=smoke", "data=image_folder", f"data.root={b}", f"teacher_data.root={tmp_path / 'c'}",
                   "data.batch_size=2"])
    with pytest.raises(ConfigError, match=r"has the classes \['cat', 'dog', 'fox'\].*same classes"):
        teacher_datamodule(cfg, prepare_data(cfg))


def fake_teacher(path: Path, data: dict, name: str = "wrn16_2") -> Path:
    from distill.models import build_model

    model = build_model(name, 10)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model_name": name, "num_classes": 10,
                                     "identity": {"network": {"name": name}, "data": data}}}, path)
    return path


def test_an_explicit_teacher_trained_on_other_data_is_used_and_its_differences_named(compose, tmp_path, caplog):
    from distill.build import identity
    from distill.teacher import resolve_teacher

    dm = SyntheticDataModule(num_train=40, num_val=10, image_size=16)
    cfg = compose(["experiment=smoke", "logger=none"])
    data = identity(cfg, "teacher", dm)["data"]
    path = fake_teacher(tmp_path / "t.ckpt", {**data, "per_class": 50, "image_size": 32})
    with open_dict(cfg):
        cfg.teacher.checkpoint = str(path)
    teacher, got, differ = resolve_teacher(cfg, dm, train=None)
    assert got == path and differ == ["image_size: 32 (checkpoint) vs 16 (config)",
                                      "per_class: 50 (checkpoint) vs absent (config)"]
    assert any("trained on other data" in r.message and "per_class" in r.message for r in caplog.records)
    fake_teacher(path, {**data, "classes": [f"c{i}" for i in range(10)]})
    with pytest.raises(CheckpointError, match="was trained on the classes"):
        resolve_teacher(cfg, dm, train=None)
    fake_teacher(path, data, name="wrn16_1")
    with pytest.raises(CheckpointError, match="holds a wrn16_1"):
        resolve_teacher(cfg, dm, train=None)


# ------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_smoke_few_shot_shortcut_run_records_the_cue_metrics_and_a_clean_full_teacher(tmp_path):
    proc = run_train(["experiment=smoke", "logger=none", "data.per_class=5", "data.shortcut.p=0.9",
                      "kd=hinton", "explain=gradcampp", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    metrics = result["metrics"]
    for key in ("test/acc", "test/conflict_acc", "test/cue_follow", "test/cue_map_mass", "test/teacher_cue_follow",
                "test/conflict_agreement", "test/conflict_map_cosine", "test/conflict_teacher_acc"):
        assert np.isfinite(metrics[key]), key
    assert metrics["test/num_images"] == 64  # the clean test images, not counted twice
    assert "with a conflicting cue (data.shortcut):" in proc.stdout and "follows the cue" in proc.stdout
    assert result["teacher_data_differences"] == []
    assert "per_class" not in result["teacher_data"] and "shortcut" not in result["teacher_data"]
    record = json.loads(Path(result["teacher_checkpoint"]).with_suffix(".json").read_text())
    assert "per_class" not in record["identity"]["data"] and "shortcut" not in record["identity"]["data"]
    teacher_run = json.loads((tmp_path / "run" / "teacher" / "metrics.json").read_text()) \
        if (tmp_path / "run" / "teacher" / "metrics.json").exists() else None
    assert teacher_run is None or "test/conflict_acc" not in teacher_run["metrics"]
    assert list((tmp_path / "run").glob("**/explanations_epoch*.png"))
