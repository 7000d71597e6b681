"""The standard KD benchmarks: CIFAR-100 and ImageNet-layout data, decoupled KD (DKD) and the
benchmark presets. Every expected number comes from the papers' equations written here, in
float64, or from a data set built in the real on-disk format."""

from __future__ import annotations

import math

import hydra.utils
import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from PIL import Image

from distill.data import CIFAR100DataModule, ImageFolderDataModule, ImageNetDataModule
from distill.errors import ConfigError, DataError
from distill.losses import decoupled_kd, dkd_parts, dkd_warmup, hinton_kd
from distill.models import build_model
from distill.module import DistillModule, LossWeights
from tests.support import CONFIG_DIR, compose_config
from tests.tiny_datasets import WNIDS, write_cifar100, write_image_tree

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # RepDistiller's dataset/cifar100.py
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ============================================================================ CIFAR-100
@pytest.fixture
def cifar100(tmp_path, monkeypatch):
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)  # tiny files: no md5 match
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    root = tmp_path / "cifar100"
    return root, write_cifar100(root)


def test_cifar100_reads_fine_labels_with_its_own_statistics(cifar100):
    root, raw = cifar100
    dm = CIFAR100DataModule(root, download=False, batch_size=8, num_workers=0, augment=False)
    assert (dm.name, dm.num_classes, dm.mean, dm.std) == ("cifar100", 100, CIFAR100_MEAN, CIFAR100_STD)
    assert dm.class_names[:3] == ["apple", "aquarium_fish", "baby"] and dm.class_names[-1] == "worm"
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 120 and len(dm.test_set) == 40
    x, y = dm.test_set[3]
    pixels = raw["test_x"][3].reshape(3, 32, 32).astype(np.float64) / 255.0
    expected = (pixels - np.array(CIFAR100_MEAN)[:, None, None]) / np.array(CIFAR100_STD)[:, None, None]
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-5)
    assert y == raw["test_y"][3]
    _, labels = next(iter(dm.train_dataloader()))
    assert labels.dtype == torch.int64 and labels.shape == (8,)
    augmented = CIFAR100DataModule(root, download=False, batch_size=8, num_workers=0)
    augmented.setup("fit")
    assert augmented.train_set.transform is not None and augmented.train_set[0][0].shape == (3, 32, 32)


def test_cifar100_offline_is_one_clear_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    root = tmp_path / "cifar100"
    with pytest.raises(DataError) as info:
        CIFAR100DataModule(root, download=True).prepare_data()
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("CIFAR-100: ") and "download failed" in msg
    assert "cifar-100-python" in msg and "train, test, meta" in msg and "data.root" in msg
    with pytest.raises(ConfigError, match="CIFAR-100 has 100 classes.*num_classes=100"):
        CIFAR100DataModule(root, num_classes=10)


# ============================================================================ image folders
def _eval_reference(path, size: int, resize: int) -> np.ndarray:
    """Resize the shorter side to ``resize``, center-crop ``size``, normalise: (3, size, size)."""
    from torchvision.transforms.v2 import functional as TF

    img = TF.pil_to_tensor(Image.open(path).convert("RGB"))
    h, w = img.shape[1:]
    short = min(h, w)
    new = (resize, round(w * resize / short)) if h <= w else (round(h * resize / short), resize)
    img = TF.resize(img, list(new), antialias=True).double() / 255.0
    top, left = round((new[0] - size) / 2), round((new[1] - size) / 2)
    img = img[:, top:top + size, left:left + size].numpy()
    return (img - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[:, None, None]


def test_imagenet_layout_counts_classes_and_uses_imagenet_transforms(tmp_path):
    write_image_tree(tmp_path, size=(40, 48))
    dm = ImageNetDataModule(tmp_path, image_size=24, resize=30, batch_size=4, num_workers=0)
    assert dm.num_classes == 3 and (dm.mean, dm.std) == (IMAGENET_MEAN, IMAGENET_STD)  # scanned, no image read
    dm.setup("fit")
    assert dm.class_names == WNIDS and len(dm.train_set) == 12 and len(dm.test_set) == 6
    x, y = dm.test_set[2]  # val/n01443537/..._00000.JPEG
    assert y == 1 and x.shape == (3, 24, 24)
    np.testing.assert_allclose(x.numpy(), _eval_reference(tmp_path / "val" / WNIDS[1] / f"{WNIDS[1]}_00000.JPEG",
                                                          24, 30), atol=1e-4)
    torch.manual_seed(0)
    crops = torch.stack([dm.train_set[0][0] for _ in range(4)])
    assert crops.shape == (4, 3, 24, 24) and not torch.equal(crops[0], crops[1])  # random-resized crops
    with pytest.raises(ConfigError, match="on_device"):
        ImageNetDataModule(tmp_path, on_device=True).setup("fit")


def test_image_folders_check_class_counts_and_lists(tmp_path):
    write_image_tree(tmp_path / "a", classes=["cat", "dog", "eel", "fox"], eval_split="test", size=(8, 8))
    assert ImageFolderDataModule(tmp_path / "a", num_classes=None).num_classes == 4
    with pytest.raises(ConfigError, match="4 class folders.*num_classes=10.*num_classes=4"):
        ImageFolderDataModule(tmp_path / "a", num_classes=10).prepare_data()
    write_image_tree(tmp_path / "b", size=(8, 8))
    (tmp_path / "b" / "val" / WNIDS[2]).rename(tmp_path / "b" / "val" / "n99999999")
    with pytest.raises(DataError) as info:
        ImageNetDataModule(tmp_path / "b").prepare_data()
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("imagenet: train/ and val/ have different class folders")
    assert "only in train: ['n01484850']; only in val: ['n99999999']" in msg


@pytest.mark.parametrize("option", ["image_folder", "imagenet"])
def test_image_folder_configs_infer_num_classes(option, tmp_path):
    cfg = compose_config(tmp_path, [f"data={option}", f"data.root={tmp_path / 'tree'}"])
    assert cfg.data.num_classes is None
    write_image_tree(tmp_path / "tree", classes=["a", "b", "c", "d", "e"],
                     eval_split="val" if option == "imagenet" else "test", size=(8, 8))
    dm = hydra.utils.instantiate(cfg.data)
    assert dm.num_classes == 5
    if option == "imagenet":
        assert (dm.image_size, dm.resize, dm.batch_size, dm.num_workers) == ((224, 224), 256, 256, 16)


# ============================================================================ DKD
def _softmax(z: list[float], temp: float) -> list[float]:
    e = [math.exp(v / temp) for v in z]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def _dkd_by_hand(zs: list[float], zt: list[float], t: int, temp: float) -> tuple[float, float]:
    """TCKD and NCKD of one sample from DKD's Eq. 1-6 (Zhao et al., CVPR 2022)."""
    ps, pt = _softmax(zs, temp), _softmax(zt, temp)
    b_s, b_t = [ps[t], 1 - ps[t]], [pt[t], 1 - pt[t]]
    hat_s = [p / (1 - ps[t]) for i, p in enumerate(ps) if i != t]
    hat_t = [p / (1 - pt[t]) for i, p in enumerate(pt) if i != t]
    return _kl(b_t, b_s), _kl(hat_t, hat_s)


def test_dkd_matches_the_papers_equations_float64():
    zs = [[1.0, -0.5, 2.0, 0.3], [0.2, 0.1, -1.0, 3.0]]
    zt = [[2.5, 0.0, 1.0, -1.0], [-0.3, 1.2, 0.4, 0.9]]
    labels = [0, 3]
    temp, alpha, beta = 2.0, 1.0, 8.0
    s, t, y = torch.tensor(zs, dtype=torch.float64), torch.tensor(zt, dtype=torch.float64), torch.tensor(labels)
    tckd, nckd = dkd_parts(s, t, y, temp)
    assert tckd.dtype == torch.float64
    for i in range(2):
        want = _dkd_by_hand(zs[i], zt[i], labels[i], temp)
        assert (tckd[i].item(), nckd[i].item()) == pytest.approx(want, rel=1e-12)
    hand = [_dkd_by_hand(zs[i], zt[i], labels[i], temp) for i in range(2)]
    want = temp**2 * sum(alpha * a + beta * b for a, b in hand) / 2
    assert decoupled_kd(s, t, y, alpha, beta, temp).item() == pytest.approx(want, rel=1e-12)
    assert decoupled_kd(t, t, y, alpha, beta, temp).item() == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_kd_is_tckd_plus_weighted_nckd(temp):
    """The paper's decomposition KD = TCKD + (1 - p_t^T) NCKD (Eq. 6) against hinton_kd."""
    g = torch.Generator().manual_seed(0)
    s, t = 3 * torch.randn(6, 10, generator=g), 3 * torch.randn(6, 10, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    tckd, nckd = dkd_parts(s, t, y, temp)
    p_target = torch.softmax(t / temp, dim=1).gather(1, y[:, None]).squeeze(1)
    for i in range(6):
        kd = hinton_kd(s[i:i + 1], t[i:i + 1], temp).item() / temp**2
        assert kd == pytest.approx((tckd[i] + (1 - p_target[i]) * nckd[i]).item(), rel=1e-4, abs=1e-6)


def test_dkd_gradient_is_finite_for_saturated_logits():
    s = torch.tensor([[60.0, -60.0, 0.0], [0.0, 80.0, -80.0]], requires_grad=True)
    t = torch.tensor([[90.0, -90.0, 0.0], [-90.0, 90.0, 0.0]])
    loss = decoupled_kd(s, t, torch.tensor([0, 1]), 1.0, 8.0, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_dkd_warmup_and_its_place_in_the_loss(monkeypatch):
    assert [dkd_warmup(e, 20) for e in (1, 10, 20, 30)] == [0.05, 0.5, 1.0, 1.0]  # mdistiller: epoch / warmup
    assert dkd_warmup(1, 0) == 1.0
    weights = LossWeights(ce=1.0, kd=0.0, temperature=4.0, dkd_alpha=1.0, dkd_beta=6.0, dkd_warmup=20)
    module = DistillModule(build_model("wrn16_1", 5), build_model("wrn16_1", 5), optimizer=None, weights=weights)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    terms, s_logits = module.loss_terms(x, y)
    assert set(terms) == {"ce", "dkd"}
    with torch.no_grad():
        t_logits = module.teacher(x)
    expected = decoupled_kd(s_logits, t_logits, y, 1.0, 6.0, 4.0)
    torch.testing.assert_close(terms["dkd"], expected)
    for epoch, factor in ((0, 0.05), (9, 0.5), (25, 1.0)):  # Lightning's 0-based current_epoch
        monkeypatch.setattr(DistillModule, "current_epoch", property(lambda self, e=epoch: e))
        total = module.total_loss({"ce": torch.tensor(0.5), "dkd": torch.tensor(2.0)})
        assert total.item() == pytest.approx(0.5 + factor * 2.0)
    with pytest.raises(ConfigError, match="dkd_beta"):
        LossWeights(dkd_beta=-1.0)


# ============================================================================ presets
def test_cifar100_kd_preset_is_the_repdistiller_protocol(tmp_path):
    cfg = compose_config(tmp_path, ["experiment=cifar100_kd"])
    assert (cfg.data.name, cfg.teacher.name, cfg.student.name) == ("cifar100", "wrn40_2", "wrn16_2")
    assert (cfg.trainer.max_epochs, cfg.data.batch_size) == (240, 64)
    opt, sched = cfg.optim.optimizer, cfg.optim.scheduler
    assert (opt.lr, opt.momentum, opt.nesterov, opt.weight_decay) == (0.05, 0.9, False, 5e-4)
    assert (list(sched.milestones), sched.gamma) == ([150, 180, 210], 0.1)
    assert (cfg.kd.name, cfg.loss.ce, cfg.loss.kd, cfg.loss.temperature) == ("hinton_cifar100", 0.1, 0.9, 4.0)
    dkd = compose_config(tmp_path, ["experiment=cifar100_kd", "kd=dkd"]).loss  # mdistiller wrn40_2_wrn_16_2.yaml
    assert (dkd.ce, dkd.kd, dkd.dkd_alpha, dkd.dkd_beta, dkd.temperature, dkd.dkd_warmup) == (
        1.0, 0.0, 1.0, 6.0, 4.0, 20)


IMAGENET_OVERRIDES = ["teacher=wrn16_2", "student=wrn16_1", "~teacher.arch", "~teacher.weights", "~student.arch"]


def test_imagenet_kd_preset_is_the_resnet_protocol(tmp_path):
    cfg = compose_config(tmp_path, ["experiment=imagenet_kd", *IMAGENET_OVERRIDES])
    assert cfg.data.name == "imagenet" and (cfg.trainer.max_epochs, cfg.data.batch_size) == (100, 256)
    opt, sched = cfg.optim.optimizer, cfg.optim.scheduler
    assert (opt.lr, opt.momentum, opt.weight_decay) == (0.1, 0.9, 1e-4)
    assert (list(sched.milestones), sched.gamma) == ([30, 60, 90], 0.1)
    assert (cfg.kd.name, cfg.loss.ce, cfg.loss.kd, cfg.loss.temperature) == ("hinton_imagenet", 0.5, 0.5, 1.0)
    dkd = compose_config(tmp_path, ["experiment=imagenet_kd", *IMAGENET_OVERRIDES, "kd=dkd_imagenet"]).loss
    assert (dkd.ce, dkd.kd, dkd.dkd_alpha, dkd.dkd_beta, dkd.temperature, dkd.dkd_warmup) == (
        1.0, 0.0, 1.0, 0.5, 1.0, 1)


def test_imagenet_kd_preset_names_the_torchvision_resnets(tmp_path):
    cfg = compose_config(tmp_path, ["experiment=imagenet_kd"])
    assert (cfg.teacher.arch, cfg.teacher.weights, cfg.student.arch) == ("resnet34", "IMAGENET1K_V1", "resnet18")


# ============================================================================ scripts/bench_data.py
def test_bench_data_imagenet_mode_on_upscaled_jpegs(tmp_path):
    """The data=imagenet throughput bench: an ImageNet-layout copy upscaled from a small image
    folder, the DataLoader path and torchvision's batched decode_jpeg path (on the CPU here)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_data", CONFIG_DIR.parent / "scripts" / "bench_data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    write_image_tree(tmp_path / "small", classes=["a", "b"], eval_split="test", n_train=5, n_eval=5, size=(8, 8),
                     suffix=".jpg")
    results = bench.main(["--data", "imagenet", "--root", str(tmp_path / "small"), "--make-imagenet",
                          str(tmp_path / "inet"), "--images-per-class", "5", "--upscale", "60x80", "--workers", "0",
                          "--batch-size", "4", "--batches", "1", "--decode-device", "cpu", "--train-steps", "0"])
    made = sorted((tmp_path / "inet" / "train" / "a").glob("*.JPEG"))
    assert len(made) == 5 and Image.open(made[0]).size == (80, 60)
    assert len(list((tmp_path / "inet" / "val").rglob("*.JPEG"))) == 2  # a fifth as many, one per class
    assert set(results) == {"DataLoader+PIL, 0 workers", "decode_jpeg on cpu, 0 workers reading bytes"}
    assert all(rate > 0 for rate in results.values())
    x, y = next(bench.device_decoded(iter([((made[0].read_bytes(),), (1,))]), torch.device("cpu"), (24, 24),
                                     IMAGENET_MEAN, IMAGENET_STD))
    assert x.shape == (1, 3, 24, 24) and y.tolist() == [1]
