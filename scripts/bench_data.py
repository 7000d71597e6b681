"""Does the data path keep up with training? Images/s of the CIFAR-10 and the ImageNet data paths.

    tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/data
    python scripts/bench_data.py --root /tmp/data/cifar10-jpeg
    python scripts/bench_data.py --root /tmp/data/cifar10-jpeg --batches 20 --train-steps 3
    # data=imagenet on an ImageNet-layout folder (here: CIFAR-10 JPEGs upscaled to 375x500 first)
    python scripts/bench_data.py --data imagenet --root /tmp/data/cifar10-jpeg --make-imagenet /tmp/data/inet \
        --workers 0,1,2 --batch-size 64 --batches 8 --train-steps 1
    python scripts/bench_data.py --data imagenet --root /datasets/imagenet --workers 4,8,16,32 --decode-device cuda

``--data imagenet`` prints the images/s of the ``data=imagenet`` training loader (JPEG decode +
RandomResizedCrop 224 + flip + normalise in ``--workers`` DataLoader processes), with
``--decode-device cuda`` also of torchvision's batched GPU JPEG decoding
(``torchvision.io.decode_jpeg(device="cuda")``: workers only read the files' bytes), and with
``--train-steps`` the compute-only rate of a ResNet-34 -> ResNet-18 KD step on ``--device``,
from which it prints how many workers that step needs.

For CIFAR-10 (``--data cifar``, the default) it prints, side by side:

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
import gc
import itertools
import math
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
    parser.add_argument("--data", choices=["cifar", "imagenet"], default="cifar")
    parser.add_argument("--workers", default="0,1,2", help="imagenet: the DataLoader worker counts to compare")
    parser.add_argument("--make-imagenet", metavar="DIR", default=None,
                        help="imagenet: first write DIR/{train,val}/<class>/*.JPEG from --root's images, upscaled")
    parser.add_argument("--upscale", default="375x500", help="height x width of --make-imagenet's JPEGs")
    parser.add_argument("--images-per-class", type=int, default=40, help="--make-imagenet: training images per class")
    parser.add_argument("--decode-device", default=None,
                        help="imagenet: also time torchvision.io.decode_jpeg on this device (e.g. cuda)")
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


# ---------------------------------------------------------------------------- data=imagenet
def make_imagenet_folder(src: Path, dst: Path, per_class: int, size: tuple[int, int]) -> Path:
    """``dst/train/<class>/*.JPEG`` (``per_class`` each) and ``dst/val/`` (a fifth as many) from the
    image folder ``src/{train,test}``, each image upscaled to ``size`` (h, w) and saved as JPEG q90."""
    from PIL import Image

    h, w = size
    for split, source, n in (("train", "train", per_class), ("val", "test", max(1, per_class // 5))):
        for class_dir in sorted(d for d in (src / source).iterdir() if d.is_dir()):
            out = dst / split / class_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for path in sorted(class_dir.iterdir())[:n]:
                with Image.open(path) as img:
                    img.convert("RGB").resize((w, h), Image.BICUBIC).save(out / f"{path.stem}.JPEG", quality=90)
    return dst


class JpegBytes(torch.utils.data.Dataset):
    """``(encoded JPEG bytes, label)`` of an ImageFolder: the workers only read files. Plain
    ``bytes``, not tensors: one shared-memory file descriptor per small tensor runs out of them."""

    def __init__(self, folder) -> None:
        self.samples = folder.samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        path, label = self.samples[i]
        return Path(path).read_bytes(), label


def as_lists(items: list[tuple]) -> tuple[tuple, ...]:
    """Collate ``(bytes, label)`` items into ``(all bytes, all labels)``: the JPEGs differ in length."""
    return tuple(zip(*items, strict=True))


def device_decoded(loader, device: torch.device, size: tuple[int, int], mean, std) -> Iterator:
    """Batches decoded by ``torchvision.io.decode_jpeg`` on ``device`` (one batched call), then
    RandomResizedCrop + flip per image and normalise, on ``device``."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import v2

    crop = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    for data, labels in loader:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its decoders for TorchCodec
            encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
            images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        x = torch.stack([crop(img) for img in images]).float().div_(255)
        yield (x - mean_t) / std_t, torch.as_tensor(labels).to(device, non_blocking=True)


def kd_step_rate(device: torch.device, batch_size: int, steps: int) -> float:
    """Compute-only images/s of a KD step: torchvision ResNet-34 teacher (frozen, eval) -> ResNet-18
    student, CE + Hinton KD, SGD, on one 224x224 batch already on ``device`` (bf16 autocast and
    channels_last on CUDA)."""
    import torch.nn.functional as F
    from torchvision.models import resnet18, resnet34

    from distill.losses import hinton_kd

    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    teacher = resnet34().to(device, memory_format=fmt).eval().requires_grad_(False)
    student = resnet18().to(device, memory_format=fmt).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch_size, 3, 224, 224, device=device).to(memory_format=fmt)
    y = torch.randint(0, 1000, (batch_size,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            loss = 0.5 * F.cross_entropy(s_logits, y) + 0.5 * hinton_kd(s_logits, t_logits, 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


def imagenet_main(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    from torchvision.datasets import ImageFolder

    from distill.data import ImageNetDataModule

    root = Path(args.root)
    if args.make_imagenet:
        h, w = (int(v) for v in args.upscale.lower().split("x"))
        start = time.perf_counter()
        root = make_imagenet_folder(root, Path(args.make_imagenet), args.images_per_class, (h, w))
        print(f"wrote {root} ({h}x{w} JPEGs upscaled from {args.root}) in {time.perf_counter() - start:.1f} s")
    print(f"data=imagenet on {root}, batch {args.batch_size}, {args.batches} timed batches, device {device}, "
          f"{torch.get_num_threads()} intra-op threads, torch {torch.__version__}")
    results: dict[str, float] = {}
    for n in (int(v) for v in args.workers.split(",")):
        dm = ImageNetDataModule(root, batch_size=args.batch_size, num_workers=n, seed=args.seed)
        dm.setup("fit")
        batches = to_device(endless(dm.train_dataloader()), device)
        rate = images_per_s(batches, args.batches, args.batch_size, device)
        batches.close()  # stop this loader's workers before the next count starts its own
        del dm, batches
        gc.collect()
        results[f"DataLoader+PIL, {n} workers"] = rate
        print(f"  decode + RandomResizedCrop 224 + flip, {n:2d} workers: {rate:8.1f} images/s"
              + (f"  ({rate / n:.1f} per worker)" if n else "  (in the main process)"))
    if args.decode_device:
        dev = torch.device(args.decode_device)
        n = max(int(v) for v in args.workers.split(","))
        dm = ImageNetDataModule(root, batch_size=args.batch_size, num_workers=n, seed=args.seed)
        loader = torch.utils.data.DataLoader(JpegBytes(ImageFolder(str(root / "train"))), batch_size=args.batch_size,
                                             shuffle=True, drop_last=True, num_workers=n,
                                             persistent_workers=n > 0, collate_fn=as_lists)
        batches = device_decoded(endless(loader), dev, dm.image_size, dm.mean, dm.std)
        rate = images_per_s(batches, args.batches, args.batch_size, dev)
        batches.close()
        del loader, batches
        gc.collect()
        results[f"decode_jpeg on {dev}, {n} workers reading bytes"] = rate
        print(f"  decode_jpeg on {dev} + crop/flip there, {n} workers reading bytes: {rate:8.1f} images/s")
    if args.train_steps > 0:
        compute = kd_step_rate(device, args.batch_size, args.train_steps)
        results["compute-only KD step ResNet-34 -> ResNet-18"] = compute
        per_worker = max(r / int(k.split(", ")[1].split()[0]) for k, r in results.items()
                         if k.startswith("DataLoader") and not k.endswith(", 0 workers"))
        print(f"  compute-only KD step ResNet-34 -> ResNet-18 on {device}: {compute:.1f} images/s "
              f"-> needs about {math.ceil(compute / per_worker)} workers at {per_worker:.1f} images/s per worker")
    return results


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if args.data == "imagenet":
        return imagenet_main(args, device)
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
