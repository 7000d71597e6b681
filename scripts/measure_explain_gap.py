"""Why ``train/explain`` and ``val/explain`` differ: the explanation term of one distilled student,
measured on the same images under each condition that separates training from validation.

    python scripts/measure_explain_gap.py RUN_DIR [--images 128]

RUN_DIR is a distill run's output folder (``checkpoints/last.ckpt``, whose recorded teacher file must
still exist). The term is computed by the module's own training code (``DistillModule.loss_terms``),
with its final weights, on ``--images`` training images drawn at random (clean, i.e. the evaluation transform,
and augmented as training sees them), and on the first validation images (as ``val/explain`` sees them).
Conditions: the student's BatchNorm with batch statistics (train mode, as ``train/explain``) or running
statistics (eval mode, as ``val/explain``); augmentation on or off; the teacher is always in eval mode;
the map explains the label in both (``explain.target``). Prints one table (docs/logged_terms.md).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, uninstalled


def student_maps_norm(module, x, y) -> float:
    """Mean squared L2 norm of the student's maps of the loss method (what scales the raw term)."""
    s_features, _ = module._features(module.model, x)
    logits = module.model.forward_head(s_features)
    maps = module.maps(module.model, logits, s_features, y, module.loss_method, False)
    return float(maps.detach().flatten(1).pow(2).sum(1).mean())


def measure(run_dir: Path, images: int) -> list[tuple[str, float, float]]:
    import copy

    import torch
    from omegaconf import OmegaConf

    from distill.build import instantiate
    from distill.checkpoints import read_checkpoint
    from distill.data.base import TransformSubset
    from distill.module import DistillModule

    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    hparams = read_checkpoint(checkpoint)["hyper_parameters"]
    module = DistillModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    data = instantiate(OmegaConf.create(hparams["config"]["data"]), "the data")  # an image folder
    data.setup("fit")
    torch.manual_seed(0)  # the augmentation's draw
    train_set = data.train_set
    clean_train = TransformSubset(train_set.base, train_set.indices, data.eval_transform())
    pick = torch.randperm(len(train_set))[:images].tolist()  # a shuffled batch, as training draws (folders are sorted)
    augmented = torch.stack([train_set[i][0] for i in pick])
    clean = torch.stack([clean_train[i][0] for i in pick])
    labels = torch.as_tensor([int(train_set[i][1]) for i in pick])
    val = data.validation_images()
    val_x = torch.stack([val[i][0] for i in range(images)])
    val_y = torch.as_tensor([int(val[i][1]) for i in range(images)])

    final = copy.deepcopy(module.model.state_dict())  # a train-mode forward moves BN's running statistics
    rows = []
    for name, x, y in (("training images, augmented", augmented, labels), ("training images, clean", clean, labels),
                       ("validation images", val_x, val_y)):
        for mode in ("train", "eval"):
            module.model.load_state_dict(final)
            module.train(mode == "train")  # the teacher stays in eval mode (DistillModule.train)
            terms, _ = module.loss_terms(x, y)
            bn = "batch stats (train mode)" if mode == "train" else "running stats (eval mode)"
            term = float(terms["explain"].detach())
            module.model.load_state_dict(final)
            rows.append((f"{name}, student BN {bn}", term, student_maps_norm(module, x, y)))
    module.eval()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--images", type=int, default=128, help="images per condition (default: one batch, 128)")
    args = parser.parse_args(argv)
    rows = measure(args.run_dir, args.images)
    width = max(len(r[0]) for r in rows)
    print(f"{'condition':<{width}}  explain term  mean ||L_S||^2")
    for name, term, norm in rows:
        print(f"{name:<{width}}  {term:12.2f}  {norm:14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
