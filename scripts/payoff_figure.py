"""The payoff picture: teacher | students, Grad-CAM++ of each model's prediction, on the same test images.

    python scripts/payoff_figure.py --root DIR/cifar10-jpeg --teacher T.ckpt \
        --student "KD=kd.ckpt" --student "KD + Grad-CAM++=gcpp.ckpt" [--conflicting-cue] --out docs/payoff.png

One test image of each of the first ``--num-images`` classes (the first file of the class folder).
``--conflicting-cue`` stamps every image with the shortcut cue of another class (data.shortcut's
square, size 4 at 32 px, the conflicting class fixed by ``--subset-seed`` as in the test of a
shortcut run): a student that learned the cue looks at the corner and predicts the cue's class.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, uninstalled

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # configs/data/image_folder.yaml


def test_images(root: Path, num: int):
    """``(images (N, 3, 32, 32) normalised, labels (N,), class names)``: the first file of each class."""
    import torch
    from torchvision.transforms.functional import normalize, pil_to_tensor

    from distill.data.image_folder import load_rgb

    classes = sorted(p.name for p in (root / "test").iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes[:num]):
        first = sorted((root / "test" / name).iterdir())[0]
        images.append(normalize(pil_to_tensor(load_rgb(str(first))).float() / 255, MEAN, STD))
        labels.append(label)
    return torch.stack(images), torch.tensor(labels), classes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="the image folder (holds test/<class>/)")
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--student", action="append", required=True, metavar="LABEL=CKPT")
    parser.add_argument("--conflicting-cue", action="store_true")
    parser.add_argument("--subset-seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=6)
    parser.add_argument("--cell-px", type=int, default=112)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    from distill.checkpoints import load_network
    from distill.data.shortcut import Shortcut
    from distill.errors import DistillError
    from distill.evaluation.grid import explanation_cells, grid_figure, save_figure

    try:
        images, labels, classes = test_images(args.root, args.num_images)
        if args.conflicting_cue:
            cue = Shortcut(p=1.0, size=4, num_classes=len(classes), image_size=tuple(images.shape[-2:]),
                           mean=MEAN, std=STD, seed=args.subset_seed)
            images = cue.stamp(images, cue.conflicting(labels))
        teacher, _ = load_network(args.teacher, "teacher checkpoint")
        rows = None
        for spec in args.student:
            label, _, path = spec.partition("=")
            student, _ = load_network(Path(path), f"student checkpoint ({label})")
            columns = [("student", "gradcampp")] if rows else [("teacher", "gradcampp"), ("student", "gradcampp")]
            cells = explanation_cells(student.eval(), images, labels, MEAN, STD, teacher.eval(), classes,
                                      target="pred", columns=columns)
            cells = [[replace(c, title=c.title.replace("student", label, 1)) for c in row] for row in cells]
            rows = cells if rows is None else [row + new[1:] for row, new in zip(rows, cells, strict=True)]
    except DistillError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    path = save_figure(grid_figure(rows, args.cell_px, dpi=100), args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
