"""Does the data path keep up with training? Images/s of the two CIFAR-10 training data paths.

    tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/data
    python scripts/bench_data.py --root /tmp/data/cifar10-jpeg
    python scripts/bench_data.py --root /tmp/data/cifar10-jpeg --batches 20 --train-steps 3

Prints, side by side:

1. data only: images/s of ``data.on_device=true`` (the uint8 training set as one tensor on
   the device, random crop + flip + normalise as batched tensor ops, no workers) and of the
   torchvision ``DataLoader`` + PIL path (``--num-workers`` worker processes, batches copied
   to the device), over ``--batches`` batches each;
2. training: images/s of a distillation step (WRN-40-2 -> WRN-16-2, CE + KD + Grad-CAM++,
   closed form) fed by each path, end to end, against the compute-only rate (the same step
   on one batch already on the device). ``fed / compute`` near 1 means the data path keeps up.

Timings on a machine shared with other jobs are noisy; the figures are single passes.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.data import ImageFolderDataModule  # noqa: E402
from distill.data.on_device import DeviceBatches  # noqa: E402
from distill.models import build_model  # noqa: E402
from distill.module import DistillModule, ExplainSettings, LossWeights  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="/tmp/data/cifar10-jpeg", help="image-folder tree root/{train,test}/<class>")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=50, help="batches per data-only measurement")
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader workers of the PIL path")
    parser.add_argument("--train-steps", type=int, default=5, help="timed training steps per feed (0: skip)")
    parser.add_argument("--device", default="auto", help="auto (cuda if there) | cpu | cuda ...")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(batches: Iterable, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for x, y in batches:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def images_per_s(batches: Iterator, n: int, batch_size: int, device: torch.device) -> float:
    """Rate of ``n`` batches, after a first one (worker start-up, first-touch) that is not timed."""
    next(batches)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        x, _ = next(batches)
    synchronize(device)
    return n * batch_size / (time.perf_counter() - start)


def endless(loader) -> Iterator:
    """Batches across epochs (a new epoch, hence a new shuffle, when one ends)."""
    for epoch in itertools.count():
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader


def training_rate(module: DistillModule, optimizer, batches: Iterator, steps: int, batch_size: int,
                  device: torch.device) -> float:
    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        terms, _ = module.loss_terms(x, y)
        module.total_loss(terms).backward()
        optimizer.step()

    step(*next(batches))  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(*next(batches))
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"data {args.root}, batch {args.batch_size}, device {device} ({where}), torch {torch.__version__}")

    common = {"num_classes": 10, "batch_size": args.batch_size, "seed": args.seed}
    on = ImageFolderDataModule(args.root, on_device=True, num_workers=0, **common)
    start = time.perf_counter()
    on.setup("fit")
    decode_s = time.perf_counter() - start
    images, labels = on.train_set.on(device)
    device_loader = DeviceBatches(images, labels, args.batch_size, on.mean, on.std, train=True, seed=args.seed,
                                  padding=4)
    print(f"on-device set: {tuple(images.shape)} uint8 = {images.numel() / 2**20:.0f} MiB on {device}; "
          f"decoded once in {decode_s:.1f} s (train + test JPEGs)")
    off = ImageFolderDataModule(args.root, on_device=False, num_workers=args.num_workers, **common)
    off.setup("fit")
    pil_loader = off.train_dataloader()

    rates = {
        "on-device": images_per_s(endless(device_loader), args.batches, args.batch_size, device),
        f"DataLoader+PIL ({args.num_workers} workers)": images_per_s(
            to_device(endless(pil_loader), device), args.batches, args.batch_size, device),
    }
    print(f"\ndata only, {args.batches} batches of {args.batch_size}:")
    for name, rate in rates.items():
        print(f"  {name:28s} {rate:10.0f} images/s")
    names = list(rates)
    print(f"  on-device / DataLoader+PIL: x{rates[names[0]] / rates[names[1]]:.1f}")

    results = {f"data {k}": v for k, v in rates.items()}
    if args.train_steps > 0:
        torch.manual_seed(args.seed)
        teacher = build_model("wrn40_2", 10).to(device)
        student = build_model("wrn16_2", 10).to(device)
        module = DistillModule(student, teacher, optimizer=None, weights=LossWeights(kd=1.0, explain=0.01),
                               explain=ExplainSettings(method="gradcampp")).train()
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        fixed = next(iter(device_loader))
        feeds = {
            "compute only (one batch on device)": itertools.repeat(fixed),
            "fed by on-device": endless(device_loader),
            f"fed by DataLoader+PIL ({args.num_workers} w.)": to_device(endless(pil_loader), device),
        }
        print(f"\ntraining step WRN-40-2 -> WRN-16-2, CE + KD + Grad-CAM++ (closed form), {args.train_steps} steps:")
        train_rates = {name: training_rate(module, optimizer, feed, args.train_steps, args.batch_size, device)
                       for name, feed in feeds.items()}
        compute = train_rates["compute only (one batch on device)"]
        for name, rate in train_rates.items():
            print(f"  {name:36s} {rate:9.1f} images/s   x{rate / compute:.2f} of compute-only")
        results.update({f"train {k}": v for k, v in train_rates.items()})
    return results


if __name__ == "__main__":
    main()
