"""PASCAL VOC 2007 (issue 5): data, VGG teacher/student, multi-label losses and task, mAP,
box localisation, and the whole pipeline through train.py on a tiny VOC-format tree.

Expected values come from scikit-learn, hand-worked cases or float64 numpy formulas written
here; the tiny dataset is generated in VOC's real on-disk layout (JPEGImages, Annotations XML
with difficult flags, ImageSets/Main).
"""

from __future__ import annotations

import json
import math
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from sklearn.metrics import average_precision_score

import distill.data.voc as voc_module
from distill.callbacks_localization import LocalizationCallback
from distill.data.voc import IMAGENET_MEAN, IMAGENET_STD, VOC_CLASSES, VOC2007DataModule, parse_annotation
from distill.errors import ConfigError, DataError, DistillError
from distill.evaluation.localization import box_masks, localization_scores
from distill.evaluation.voc import MultilabelMeanAP, average_precision_11point, average_precision_area
from distill.losses import masked_bce, multilabel_kd
from distill.models import build_model
from distill.models.vgg import vgg11_student, vgg16
from distill.module import DistillModule, ExplainSettings, LossWeights
from distill.tasks import MultilabelTask, MultilabelVOC11Task, build_task
from tests.conftest import CONFIG_DIR, compose_config, run_train

TINY = {"width": 0.0625, "hidden": 16}  # 4..32 channels: milliseconds per batch


# =========================================================================== a tiny VOC tree
COLOURS = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255)}  # aeroplane, bicycle, bird


def write_image(voc: Path, name: str, size: tuple[int, int], objects: list[tuple]) -> None:
    """``objects``: ``(class index, xmin, ymin, xmax, ymax, difficult)`` in VOC's 1-based pixels."""
    w, h = size
    img = np.full((h, w, 3), 40, dtype=np.uint8)
    xml = [f"<annotation><folder>VOC2007</folder><filename>{name}.jpg</filename>"
           f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"]
    for c, x1, y1, x2, y2, difficult in objects:
        img[y1 - 1:y2, x1 - 1:x2] = COLOURS[c % 3]
        xml.append(f"<object><name>{VOC_CLASSES[c]}</name><pose>Unspecified</pose><truncated>0</truncated>"
                   f"<difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                   f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    xml.append("</annotation>")
    Image.fromarray(img).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
    (voc / "Annotations" / f"{name}.xml").write_text("".join(xml))


def make_voc_tree(root: Path, n_trainval: int = 12, n_test: int = 8, seed: int = 0) -> Path:
    """``root/VOCdevkit/VOC2007`` with random coloured boxes of classes 0-2; every third object
    is difficult. Image 0 of trainval has a difficult-only bird. Returns the VOC2007 folder."""
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    names: dict[str, list[str]] = {"trainval": [], "test": []}
    k = 0
    for split, n in (("trainval", n_trainval), ("test", n_test)):
        for _ in range(n):
            name = f"{k:06d}"
            if k == 0:
                objects = [(0, 3, 4, 30, 40, 0), (2, 40, 10, 70, 50, 1)]
            else:
                objects = []
                for j in range(int(rng.integers(1, 4))):
                    x1, y1 = int(rng.integers(1, 36)), int(rng.integers(1, 28))
                    x2, y2 = int(rng.integers(x1 + 8, 73)), int(rng.integers(y1 + 8, 57))
                    objects.append((int(rng.integers(0, 3)), x1, y1, x2, y2, int(j == 2)))
            write_image(voc, name, (72, 56), objects)
            names[split].append(name)
            k += 1
    for split, ids in names.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return voc


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("voc")
    make_voc_tree(root)
    return root


def voc_dm(root: Path, **kw) -> VOC2007DataModule:
    args = {"root": root, "download": False, "image_size": 64, "batch_size": 4, "num_workers": 0}
    return VOC2007DataModule(**{**args, **kw})


# =========================================================================== data
def test_annotation_difficult_only_class_is_ignored(tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text(
        "<annotation>"
        "<object><name>dog</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>2</ymin>"
        "<xmax>10</xmax><ymax>20</ymax></bndbox></object>"
        "<object><name>cat</name><difficult>1</difficult><bndbox><xmin>5</xmin><ymin>5</ymin>"
        "<xmax>9</xmax><ymax>9</ymax></bndbox></object>"
        "<object><name>cat</name><difficult>0</difficult><bndbox><xmin>3</xmin><ymin>4</ymin>"
        "<xmax>7</xmax><ymax>8</ymax></bndbox></object>"
        "</annotation>"
    )
    rec = parse_annotation(xml, "a.jpg")
    dog, cat = VOC_CLASSES.index("dog"), VOC_CLASSES.index("cat")
    expected = torch.zeros(20, dtype=torch.int64)
    expected[dog], expected[cat] = -1, 1  # difficult-only -> ignored; one easy object -> positive
    assert torch.equal(rec.labels, expected)
    assert rec.box_labels.tolist() == [dog, cat, cat] and rec.difficult.tolist() == [True, True, False]
    assert rec.boxes[0].tolist() == [0.0, 1.0, 10.0, 20.0]  # 1-based inclusive -> 0-based edges


def test_broken_annotation_names_the_file(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<annotation><object><name>unicorn</name></object></annotation>")
    with pytest.raises(DataError, match="bad.xml.*unicorn"):
        parse_annotation(bad, "x.jpg")


def test_datamodule_batches(voc_root):
    dm = voc_dm(voc_root)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.task == "multilabel" and len(dm.train_set) == 12 and len(dm.test_set) == 8
    assert dm.val_set is dm.test_set  # validate on the test split
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 2  # training batches stay (images, targets)
    x, y = batch
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32
    assert y.shape == (4, 20) and y.dtype == torch.int64 and set(y.unique().tolist()) <= {-1, 0, 1}
    x, y, boxes, labels, difficult = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 64, 64) and y.shape == (4, 20)
    n = boxes.shape[1]
    assert boxes.shape == (4, n, 4) and labels.shape == (4, n) and difficult.shape == (4, n)
    assert difficult.dtype == torch.bool and ((labels == -1) | (labels < 20)).all()
    padded = labels == -1
    assert (boxes[padded] == 0).all() and not difficult[padded].any()
    # targets agree with the boxes: positive <=> an easy box of that class
    for b in range(4):
        easy = set(labels[b][(labels[b] >= 0) & ~difficult[b]].tolist())
        assert set(torch.nonzero(y[b] == 1).flatten().tolist()) == easy
    # ImageNet normalisation: the grey background (40/255) maps to (40/255 - mean) / std
    corner = x[:, :, 0, 0]
    bg = torch.tensor([(40 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    assert ((corner - bg).abs() < 0.1).all(dim=1).any()


def test_difficult_only_target_is_minus_one(voc_root):
    dm = voc_dm(voc_root, augment=False)
    dm.setup("fit")
    _, y = dm.train_set[0]
    assert y[0] == 1 and y[2] == -1 and (y[3:] == 0).all() and y[1] == 0


def test_eval_boxes_follow_resize_and_center_crop(tmp_path):
    """The transformed box still frames the coloured rectangle in the transformed image."""
    voc = make_voc_tree(tmp_path, n_trainval=1, n_test=1)
    write_image(voc, "000001", (120, 80), [(0, 31, 11, 100, 60, 0)])  # the test image
    dm = voc_dm(tmp_path, image_size=48)
    dm.setup("test")
    x, _, boxes, labels, _ = next(iter(dm.test_dataloader()))
    assert labels[0, 0] == 0
    x1, y1, x2, y2 = boxes[0, 0].tolist()
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    red = (x[0] * std + mean)[0] > 0.6  # (H, W) pixels of the red rectangle
    rows, cols = torch.nonzero(red, as_tuple=True)
    # the red pixels span the box (up to a pixel of resampling blur at the edges)
    assert abs(cols.min().item() - x1) <= 1.0 and abs(cols.max().item() + 1 - x2) <= 1.0
    assert abs(rows.min().item() - y1) <= 1.0 and abs(rows.max().item() + 1 - y2) <= 1.0
    # by hand: 120x80 -> shorter side 48 * 256/224 = 55 -> 82x55 (scale 82/120, 55/80); center crop 48
    # drops (82-48)/2 = 17 columns and round(3.5) = 4 rows; VOC box x 31..100, y 11..60 = edges 30..100, 10..60
    expected = [30 * 82 / 120 - 17, 10 * 55 / 80 - 4, 48.0, 60 * 55 / 80 - 4]  # x2 = 51.3 clipped to 48
    assert boxes[0, 0].tolist() == pytest.approx(expected, abs=1e-4)


def test_val_split_has_boxes_and_train_subset(voc_root):
    dm = voc_dm(voc_root, val_split=0.25, train_subset=6)
    dm.setup("fit")
    assert len(dm.val_set) == 3 and len(dm.train_set) == 6
    assert len(next(iter(dm.val_dataloader()))) == 5


def test_missing_dataset_is_a_clear_error(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("download attempted although download=False")

    monkeypatch.setattr(voc_module, "VOCDetection", no_download)
    dm = voc_dm(tmp_path / "nowhere")
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert "VOCdevkit/VOC2007" in msg and "data.root" in msg and "data.download=false" in msg
    assert "VOCtest_06-Nov-2007.tar" in msg
    with pytest.raises(DataError, match="does not exist"):
        dm.setup("fit")


def test_root_pointing_inside_vocdevkit_gets_a_hint(voc_root):
    dm = voc_dm(voc_root / "VOCdevkit" / "VOC2007")
    with pytest.raises(DataError, match="the folder that contains VOCdevkit"):
        dm.prepare_data()


def test_missing_test_split_listing(tmp_path):
    voc = make_voc_tree(tmp_path, n_trainval=2, n_test=1)
    (voc / "ImageSets" / "Main" / "test.txt").unlink()
    with pytest.raises(DataError, match="test.txt is missing"):
        voc_dm(tmp_path).prepare_data()


def test_missing_image_names_the_file(tmp_path):
    voc = make_voc_tree(tmp_path, n_trainval=2, n_test=1)
    (voc / "JPEGImages" / "000001.jpg").unlink()
    with pytest.raises(DataError, match="000001.jpg"):
        voc_dm(tmp_path).setup("fit")


def test_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    def offline(*args, download=False, **kwargs):
        assert download
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(voc_module, "VOCDetection", offline)
    dm = voc_dm(tmp_path / "voc", download=True)
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    assert "download failed" in str(info.value) and "URLError" in str(info.value)
    assert info.value.__cause__ is None


def test_argument_checks(tmp_path):
    with pytest.raises(ConfigError, match="20 classes"):
        voc_dm(tmp_path, num_classes=10)
    with pytest.raises(ConfigError, match="data.ap"):
        voc_dm(tmp_path, ap="auc")
    with pytest.raises(ConfigError, match="loc_deltas"):
        voc_dm(tmp_path, loc_deltas=[1.5])
    assert voc_dm(tmp_path, ap="11point").task == "multilabel_voc11"
    with pytest.raises(ConfigError, match="max_map_targets"):
        voc_dm(tmp_path, max_map_targets=0)


def test_max_map_targets_reaches_the_task(tmp_path):
    from distill.run import task_of

    task = task_of(voc_dm(tmp_path, max_map_targets=3), 20)
    assert isinstance(task, MultilabelTask) and task.max_map_targets == 3
    assert task.map_targets(torch.ones(2, 20, dtype=torch.int64), torch.zeros(2, 20), "label").shape == (2, 3)
    assert task_of(voc_dm(tmp_path), 20).max_map_targets == 20


# =========================================================================== models
def test_student_has_27m_parameters_and_vgg11_layers():
    model = vgg11_student(20)
    assert abs(sum(p.numel() for p in model.parameters()) - 27e6) <= 1e6
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) == 8 and len(linears) == 3  # 11 weight layers
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    a = model.forward_features(torch.randn(2, 3, 64, 64))
    assert a.shape == (2, 512, 4, 4)  # before the final max-pool: H/16
    assert model.forward_head(a).shape == (2, 20)


@pytest.fixture(scope="module")
def torchvision_vgg16():
    import torchvision

    return torchvision.models.vgg16(num_classes=20).eval()


def test_vgg16_is_torchvision_vgg16_and_explains_the_last_conv_block(torchvision_vgg16):
    reference = torchvision_vgg16
    model = vgg16(20).eval()
    model.load_state_dict(reference.state_dict(), strict=True)  # same names and shapes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = model.forward_features(x)
        assert a.shape == (2, 512, 4, 4)
        assert torch.allclose(a, reference.features[:30](x))  # output of the last conv block's ReLU
        assert isinstance(reference.features[30], torch.nn.MaxPool2d)  # ... before the final max-pool
        assert torch.allclose(model.forward_head(a), reference(x), atol=1e-6)
    assert abs(sum(p.numel() for p in model.parameters()) - 134.3e6) < 0.1e6  # 138.4 M with 1000 classes


def test_pretrained_vgg16_loads_imagenet_weights_except_the_head(torchvision_vgg16, monkeypatch):
    state = dict(torchvision_vgg16.state_dict())  # ImageNet's file has a 1000-way head:
    state["classifier.6.weight"], state["classifier.6.bias"] = torch.randn(1000, 4096), torch.randn(1000)
    calls = []

    def from_cache(url, **kwargs):
        calls.append(url)
        return state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", from_cache)
    model = vgg16(20, pretrained=True, finetune="head")
    assert calls and calls[0].endswith("vgg16-397923af.pth")
    own = model.state_dict()
    for key in ("features.0.weight", "features.28.bias", "classifier.0.weight", "classifier.3.weight"):
        assert torch.equal(own[key], state[key])
    assert own["classifier.6.weight"].shape == (20, 4096)
    assert not any(p.requires_grad for p in model.features.parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert all(p.requires_grad for p in vgg16(20, finetune="all", **TINY).parameters())


def test_pretrained_vgg16_offline_is_a_clear_error(tmp_path, monkeypatch):
    def offline(url, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(DistillError) as info:
        vgg16(20, pretrained=True)
    msg = str(info.value)
    assert "teacher.pretrained=false" in msg and str(tmp_path) in msg and "URLError" in msg
    assert "IMAGENET1K_V1" in msg


def test_vgg_option_checks():
    with pytest.raises(ConfigError, match="finetune"):
        vgg16(20, finetune="last")
    with pytest.raises(ConfigError, match="width=1"):
        vgg16(20, pretrained=True, width=0.5)


def test_configs_build_the_models(tmp_path):
    cfg = compose_config(tmp_path, ["experiment=smoke_voc"])
    for role in ("teacher", "student"):
        node = OmegaConf.to_container(cfg[role], resolve=True)
        options = {k: v for k, v in node.items() if k not in ("name", "checkpoint", "compile")}
        model = build_model(node["name"], int(cfg.data.num_classes), **options)
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 20)
    full = compose_config(tmp_path, ["experiment=voc2007_paper"])
    assert full.teacher.name == "vgg16" and full.teacher.pretrained and full.teacher.finetune == "head"
    assert full.student.name == "vgg11_student" and full.data.name == "voc2007" and full.data.image_size == 224
    assert (CONFIG_DIR / "optim" / "sgd_voc.yaml").is_file() and full.optim.optimizer.lr == 0.01


# =========================================================================== dropout and maps
def _student_and_features(seed: int = 0):
    torch.manual_seed(seed)
    model = vgg11_student(20, dropout=0.5, **TINY).train()
    x = torch.randn(3, 3, 64, 64)
    features = model.forward_features(x)
    return model, features


def _distiller(student, teacher=None):
    teacher = teacher or vgg16(20, **TINY)
    return DistillModule(student, teacher, optimizer=torch.optim.SGD, weights=LossWeights(explain=1.0),
                         explain=ExplainSettings(method="gradcampp"), task=MultilabelTask(20))


def test_student_maps_in_training_are_computed_with_dropout_off():
    model, features = _student_and_features()
    module = _distiller(model)
    target = torch.tensor([[0, 3, -1], [5, -1, -1], [1, 2, 7]])
    logits = model.forward_head(features)  # dropout on: what CE / KD see
    maps_a = module.maps(model, logits, features, target, "gradcampp", True)
    maps_b = module.maps(model, model.forward_head(features), features, target, "gradcampp", True)
    assert torch.equal(maps_a, maps_b)  # deterministic although the model is in train mode
    model.eval()
    reference = module.maps(model, model.forward_head(features), features, target, "gradcampp", False)
    assert torch.allclose(maps_a, reference, atol=1e-6)  # the maps of the evaluated network
    assert maps_a.requires_grad  # still differentiable for the explanation loss
    model.train()
    # control: maps taken from the dropped-out logits are random (the test can fail)
    from distill.explain import explanation_maps

    raw_a = explanation_maps(model.forward_head(features), features, target, "gradcampp", True)
    raw_b = explanation_maps(model.forward_head(features), features, target, "gradcampp", True)
    assert not torch.allclose(raw_a, raw_b)
    assert not torch.allclose(model.forward_head(features), model.forward_head(features, dropout=False))


def _gradcam_one(model, features, b, c):
    """Independent Grad-CAM for one (image, class): autograd on one logit, numpy-free formula."""
    a = features[b : b + 1].detach().requires_grad_(True)
    model.eval()
    (g,) = torch.autograd.grad(model.forward_head(a)[0, c], a)
    return F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1))[0]


def test_batched_multilabel_maps_match_one_pair_at_a_time():
    model, features = _student_and_features(1)
    model.eval()
    features = features.detach().requires_grad_(True)
    target = torch.tensor([[2, 7, -1, -1], [0, 1, 4, 19], [-1, -1, -1, -1]])
    module = _distiller(model)
    maps = module.maps(model, model.forward_head(features), features, target, "gradcam", False)
    assert maps.shape == (3, 4, 4, 4)
    for b in range(3):
        for t in range(4):
            c = int(target[b, t])
            expected = torch.zeros(4, 4) if c < 0 else _gradcam_one(model, features, b, c)
            assert torch.allclose(maps[b, t], expected, atol=1e-6, rtol=1e-4), (b, t)


def test_explain_loss_trains_the_student_through_the_vgg_head():
    torch.manual_seed(0)
    student = vgg11_student(20, **TINY)
    module = _distiller(student)
    module.train()
    x = torch.randn(4, 3, 64, 64)
    y = torch.zeros(4, 20, dtype=torch.int64)
    y[0, [1, 5]] = 1
    y[1, 2] = 1
    y[2, 3] = -1  # difficult only: not explained
    y[3, [0, 6, 9]] = 1
    terms, _ = module.loss_terms(x, y)
    assert math.isfinite(terms["explain"].item()) and terms["explain"] > 0
    grads = torch.autograd.grad(terms["explain"], [student.features[0].weight, student.classifier[0].weight])
    assert all(g.abs().sum() > 0 for g in grads)  # second order through the head, down to the convs
    assert all(p.grad is None for p in module.teacher.parameters())


# =========================================================================== losses
def _np_bce(z, y):
    p = 1 / (1 + np.exp(-z))
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def test_masked_bce_ignores_difficult_entries():
    g = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(5, 20, generator=g, dtype=torch.float64)
    y = torch.randint(-1, 2, (5, 20), generator=g)
    keep = (y >= 0).numpy()
    expected = _np_bce(z.numpy(), y.clamp_min(0).numpy())[keep].mean()
    assert masked_bce(z, y).item() == pytest.approx(expected, rel=1e-5)
    z.requires_grad_(True)
    (grad,) = torch.autograd.grad(masked_bce(z, y), z)
    assert (grad[y == -1] == 0).all() and (grad[y >= 0] != 0).all()
    assert masked_bce(z, torch.full_like(y, -1)).item() == 0.0


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_multilabel_kd_is_scaled_bernoulli_kl(temp):
    g = torch.Generator().manual_seed(1)
    zs, zt = 3 * torch.randn(4, 20, generator=g), 3 * torch.randn(4, 20, generator=g)
    ps, pt = 1 / (1 + np.exp(-zs.double().numpy() / temp)), 1 / (1 + np.exp(-zt.double().numpy() / temp))
    kl = pt * np.log(pt / ps) + (1 - pt) * np.log((1 - pt) / (1 - ps))
    assert multilabel_kd(zs, zt, temp).item() == pytest.approx(temp**2 * kl.mean(), rel=1e-4)
    assert multilabel_kd(zt, zt, temp).item() == pytest.approx(0.0, abs=1e-6)
    zs.requires_grad_(True)
    (grad,) = torch.autograd.grad(multilabel_kd(zs, zt, temp), zs)
    assert np.allclose(grad.double().numpy(), temp * (ps - pt) / zs.numel(), atol=1e-6)


# =========================================================================== task
def test_map_targets_all_positives_first_then_padding():
    task = MultilabelTask(6)
    labels = torch.tensor([[0, 1, -1, 0, 1, 1], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    target = task.map_targets(labels, torch.zeros(3, 6), "label")
    assert target.tolist() == [[1, 4, 5, -1, -1, -1], [-1] * 6, [0, -1, -1, -1, -1, -1]]
    logits = torch.tensor([[-1.0, 2, -3, 0.5, -1, -2]]).repeat(3, 1)
    assert task.map_targets(labels, logits, "teacher_pred")[0].tolist() == [1, 3, -1, -1, -1, -1]
    capped = MultilabelTask(6, max_map_targets=2).map_targets(labels, logits, "label")
    assert capped.shape == (3, 2) and capped[0].tolist() == [1, 4]


def test_agreement_and_task_registry():
    task = build_task("multilabel", 4)
    s = torch.tensor([[1.0, -1, 2, -3], [1.0, 1, 1, 1]])
    t = torch.tensor([[2.0, -2, -1, -1], [-1.0, -1, -1, -1]])
    assert task.agreement(s, t).tolist() == [0.75, 0.0]
    assert task.score_name == "map" and build_task("multilabel_voc11", 4).score_name == "map11"
    assert isinstance(build_task("multilabel_voc11", 4), MultilabelVOC11Task)


# =========================================================================== mAP
def _sklearn_ap(scores: np.ndarray, target: np.ndarray) -> list[float]:
    out = []
    for c in range(target.shape[1]):
        keep = target[:, c] >= 0
        out.append(average_precision_score(target[keep, c], scores[keep, c]))
    return out


def test_map_matches_sklearn_ignoring_difficult():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(60, 20, generator=g)
    target = torch.randint(0, 2, (60, 20), generator=g)
    target[torch.rand(60, 20, generator=g) < 0.15] = -1
    target[0] = 1  # every class has a positive
    metric = MultilabelMeanAP(20)
    for chunk in range(3):  # several batches, as in an epoch
        metric.update(logits[20 * chunk : 20 * chunk + 20], target[20 * chunk : 20 * chunk + 20])
    expected = _sklearn_ap(logits.numpy(), target.numpy())
    assert np.allclose(metric.per_class().numpy(), expected, atol=1e-6)
    assert metric.compute().item() == pytest.approx(np.mean(expected), abs=1e-6)
    assert np.allclose(average_precision_area(logits, target).numpy(), expected, atol=1e-9)
    # the ignored entries matter: counting them as negatives changes the result
    assert not np.isclose(np.mean(_sklearn_ap(logits.numpy(), target.clamp_min(0).numpy())), np.mean(expected))


def test_map_leaves_out_classes_without_positives():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.3]])
    target = torch.tensor([[1, 0], [0, 0], [0, -1]])
    metric = MultilabelMeanAP(2)
    metric.update(scores, target)
    assert metric.compute().item() == pytest.approx(1.0)  # class 0 only: AP 1


def test_11point_ap_hand_worked():
    # ranked: tp(P1,R1/3) fp tp(P2/3,R2/3) ignored fp tp(P3/5,R1)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    target = torch.tensor([1, 0, 1, -1, 0, 1])
    # t = 0..0.3: max P = 1; t = 0.4..0.6: 2/3; t = 0.7..1.0: 3/5  ->  (4 + 3 * 2/3 + 4 * 0.6) / 11
    assert average_precision_11point(scores, target).item() == pytest.approx(8.4 / 11, abs=1e-12)
    # non-interpolated: (1 + 2/3 + 3/5) / 3, = sklearn's once the ignored image is dropped
    assert average_precision_area(scores, target).item() == pytest.approx((1 + 2 / 3 + 0.6) / 3, abs=1e-12)
    keep = target >= 0
    assert average_precision_area(scores, target).item() == pytest.approx(
        average_precision_score(target[keep].numpy(), scores[keep].numpy()))
    metric = MultilabelMeanAP(2, interpolation="11point")  # class 1: no positive, left out
    metric.update(torch.stack([scores, scores], 1), torch.stack([target, torch.zeros_like(target)], 1))
    assert metric.compute().item() == pytest.approx(8.4 / 11, abs=1e-6)


def _voc07_reference(scores: np.ndarray, target: np.ndarray) -> float:
    """The VOC devkit's loop (VOCevalcls.m), with thresholds k/10."""
    order = np.argsort(-scores, kind="stable")
    gt = target[order]
    tp, fp = np.cumsum(gt == 1), np.cumsum(gt == 0)
    rec = tp / (target == 1).sum()
    prec = tp / np.maximum(tp + fp, np.finfo(float).tiny)
    ap = 0.0
    for k in range(11):
        reached = prec[rec >= k / 10]
        ap += (reached.max() if reached.size else 0.0) / 11
    return ap


def test_11point_ap_matches_the_devkit_loop_on_random_data():
    rng = np.random.default_rng(5)
    scores = rng.random((200, 20))
    target = rng.integers(0, 2, (200, 20)) * (rng.random((200, 20)) < 0.3)
    target[rng.random((200, 20)) < 0.1] = -1
    target[0] = 1
    got = average_precision_11point(torch.from_numpy(scores), torch.from_numpy(target)).numpy()
    expected = [_voc07_reference(scores[:, c], target[:, c]) for c in range(20)]
    assert np.allclose(got, expected, atol=1e-12)


def test_tied_scores_form_one_point():
    scores = torch.tensor([0.5, 0.5, 0.1])
    target = torch.tensor([0, 1, 1])
    expected = average_precision_score(target.numpy(), scores.numpy())  # sklearn groups ties too
    assert average_precision_area(scores, target).item() == pytest.approx(expected)
    # 11-point: the tie is one point (P 1/2, R 1/2), then (P 2/3, R 1) -> all thresholds 2/3
    assert average_precision_11point(scores, target).item() == pytest.approx(2 / 3)


# =========================================================================== localisation
def test_box_masks_use_voc_pixel_convention(tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text("<annotation><object><name>cat</name><difficult>0</difficult><bndbox><xmin>1</xmin>"
                   "<ymin>2</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></object></annotation>")
    rec = parse_annotation(xml, "a.jpg")
    mask = box_masks(rec.boxes[None], (3, 4))[0, 0]  # VOC pixels x 1..2, y 2 -> row 1, cols 0-1
    expected = torch.zeros(3, 4, dtype=torch.bool)
    expected[1, 0:2] = True
    assert torch.equal(mask, expected)


def test_localization_hand_worked():
    maps = torch.zeros(1, 3, 4, 4)
    maps[0, 0, :2, :2] = 1.0  # fills the box exactly
    maps[0, 0, 3, 3] = 0.6  # outside, above delta=0.5
    maps[0, 0, 2, 2] = 0.3  # outside, below delta=0.5
    maps[0, 1, 3, 3] = 2.0  # class 1: entirely outside its box
    maps[0, 2] = 5.0  # class 2: only a difficult box -> not scored
    boxes = torch.tensor([[[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 4.0, 1.0], [0, 0, 4, 4],
                           [0, 0, 0, 0]]])
    box_labels = torch.tensor([[0, 1, 1, 2, -1]])
    difficult = torch.tensor([[False, False, False, True, False]])
    target = torch.tensor([[0, 1, 2]])
    scores, valid = localization_scores(maps, boxes, box_labels, difficult, target, (4, 4), deltas=(0.0, 0.5))
    assert valid.tolist() == [[True, True, False]]
    # delta 0: kept = 4 inside + 2 outside -> 4 / (4 + 2); delta 0.5: 4 / (4 + 1)
    assert scores[:, 0, 0].tolist() == pytest.approx([4 / 6, 4 / 5])
    # class 1: union of two boxes (1 + 2 pixels), kept pixel outside -> 0 / (3 + 1)
    assert scores[:, 0, 1].tolist() == [0.0, 0.0]
    # an all-zero map scores 0; padding targets are not valid
    zero, valid = localization_scores(torch.zeros(1, 2, 4, 4), boxes, box_labels, difficult,
                                      torch.tensor([[0, -1]]), (4, 4))
    assert zero[0, 0, 0] == 0 and valid.tolist() == [[True, False]]


def test_localization_upsamples_maps_to_the_image():
    maps = torch.zeros(1, 1, 2, 2)
    maps[0, 0, 0, 0] = 1.0  # top-left quadrant after upsampling
    boxes = torch.tensor([[[0.0, 0.0, 4.0, 4.0]]])
    scores, _ = localization_scores(maps, boxes, torch.tensor([[0]]), torch.tensor([[False]]), torch.tensor([[0]]),
                                    (8, 8), deltas=(0.5,))
    up = F.interpolate(maps, size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
    kept = up >= 0.5 * up.max()
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[:4, :4] = True
    expected = (kept & inside).sum() / (inside.sum() + (kept & ~inside).sum())
    assert scores.item() == pytest.approx(expected.item())


def test_localization_callback_names_and_roles():
    assert LocalizationCallback.metric_name("test", 0.5, "student") == "test/loc50_student"
    assert LocalizationCallback.metric_name("val", 0.0, "teacher") == "val/loc00_teacher"


# =========================================================================== end to end
def _metrics(root: Path) -> dict:
    (path,) = sorted(root.rglob("metrics.json"))
    return json.loads(path.read_text())


@pytest.mark.slow
def test_voc_pipeline_through_train_py(voc_root, tmp_path):
    """Teacher fine-tuned first (none exists), then distilled with Grad-CAM++ maps of every
    positive class + multi-label KD; mAP, teacher mAP, localisation at val and test."""
    proc = run_train(["experiment=smoke_voc", "logger=none", f"data.root={voc_root}", "explain=gradcampp",
                      "kd=hinton"], tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "No teacher checkpoint" in proc.stdout + proc.stderr
    result = _metrics(tmp_path)
    metrics = result["metrics"]
    assert result["stage"] == "distill"
    for key in ("test/map", "test/teacher_map", "val/map", "test/agreement", "test/map_cosine", "train/ce",
                "train/kd", "train/explain", "test/explain", "test/loss", "test/loc00_student", "test/loc50_student",
                "test/loc00_teacher",
                "test/loc50_teacher", "val/loc50_student"):
        assert math.isfinite(metrics[key]), key
    assert 0 <= metrics["test/map"] <= 1 and 0 <= metrics["test/loc50_teacher"] <= 1
    assert "test/acc" not in metrics
    assert Path(result["checkpoint/best"]).is_file()  # monitored val/map


@pytest.mark.slow
def test_voc_teacher_stage_with_11point_map(voc_root, tmp_path):
    teacher = tmp_path / "vgg16_voc.ckpt"
    proc = run_train(["experiment=smoke_voc", "logger=none", "stage=teacher", f"data.root={voc_root}",
                      "data.ap=11point", "data.loc_on_val=false", f"teacher.checkpoint={teacher}"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = _metrics(tmp_path)["metrics"]
    assert 0 <= metrics["test/map11"] <= 1 and math.isfinite(metrics["val/map11"])
    assert math.isfinite(metrics["test/loc50_teacher"]) and "val/loc50_teacher" not in metrics
    assert teacher.is_file()


@pytest.mark.slow
def test_missing_voc_through_train_py_is_one_line(tmp_path):
    proc = run_train(["experiment=smoke_voc", "logger=none", f"data.root={tmp_path / 'none'}"], tmp_path)
    assert proc.returncode == 2
    assert "PASCAL VOC 2007" in proc.stderr and "Traceback" not in proc.stderr
