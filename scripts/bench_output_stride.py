"""What ``output_stride=8`` costs: forward + backward time of a timm network at CIFAR size.

    python scripts/bench_output_stride.py                       # resnet18, 32 px, batch 64
    python scripts/bench_output_stride.py --arch convnext_atto --batch-size 32 --steps 5

At 32 x 32 pixels an ImageNet-style network (stride 32) explains a 1 x 1 map; with
``output_stride=8`` its last two stages dilate instead of striding and it explains 4 x 4, at the
price of running those stages on 16x (layer3: 4x) more positions. Both variants run round-robin
in every step (their order alternates), so a load change on a shared machine hits both alike;
the figures are medians. The FLOP ratio (``torch.utils.flop_counter``) does not depend on the
machine's load. The last line is ``output_stride 8/32 time ratio: X``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distill.models import build_model


def step_seconds(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """One forward + backward (cross-entropy), in seconds."""
    start = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    return time.perf_counter() - start


def step_flops(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    """FLOPs of one forward + backward (``torch.utils.flop_counter``): the load-independent cost."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(images), labels).backward()
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="resnet18", help="a timm architecture that takes output_stride")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    models = {stride: build_model("timm", 10, arch=args.arch, output_stride=stride).train() for stride in (32, 8)}
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 10, (args.batch_size,))
    times: dict[int, list[float]] = {stride: [] for stride in models}
    for step in range(args.steps + 1):
        order = list(models) if step % 2 == 0 else list(models)[::-1]
        for stride in order:
            seconds = step_seconds(models[stride], images, labels)
            if step:  # the first step warms up
                times[stride].append(seconds)
    for stride, model in models.items():
        with torch.no_grad():
            h, w = model.eval().forward_features(images[:2]).shape[-2:]
        print(f"output_stride {stride:2d}: {h}x{w} map, {statistics.median(times[stride]) * 1000:.1f} ms per "
              f"forward + backward ({args.arch}, batch {args.batch_size}, {args.image_size} px)")
    flops = {stride: step_flops(model.train(), images, labels) for stride, model in models.items()}
    print(f"output_stride 8/32 FLOP ratio: {flops[8] / flops[32]:.2f} ({flops[8] / 1e9:.1f} / {flops[32] / 1e9:.1f} "
          "GFLOP per forward + backward)")
    ratio = statistics.median(times[8]) / statistics.median(times[32])
    print(f"output_stride 8/32 time ratio: {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
