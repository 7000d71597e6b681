"""Time and memory of one distillation training step, with and without explanations.

    python scripts/bench_step.py                      # WRN-40-2 -> WRN-16-2, batch 128
    python scripts/bench_step.py --steps 3 --batch-size 64 --precision bf16
    python scripts/bench_step.py --teacher torchvision:resnet34 --student torchvision:resnet18 --image-size 224
    python scripts/bench_step.py --teacher timm:convnext_atto --student timm:mobilenetv3_small_050

A model is a registered name (``wrn40_2``) or ``timm:<arch>`` / ``torchvision:<arch>``.

Side by side, in one process and on the same batches, one training step (forward, loss,
backward, SGD step) of:

    CE only                       the student alone
    CE + KD                       Hinton KD from the frozen teacher (the reference)
    CE + KD + Grad-CAM            + explanation loss, closed-form maps (the default for WRNs)
    CE + KD + Grad-CAM++          + explanation loss, closed-form maps (the default for WRNs)
    ... (autograd)                the same with explain.closed_form=false: maps through
                                  torch.autograd.grad(create_graph=True), i.e. double backward

The variants run round-robin inside every step (their order rotates from step to step), so
a load change on a shared machine hits all of them alike; the figures are medians over the
timed steps. Memory is the bytes of the distinct storages that autograd saves for backward
(``torch.autograd.graph.saved_tensors_hooks``, measured on a separate, untimed step),
parameters included, and again without the parameters' storages ("no params"); on CUDA the
peak allocated memory of a step is printed too.

The last line is ``explain/kd time ratio: X  memory ratio: Y`` for the Grad-CAM++ step (the
training default, closed form) against the CE + KD step. Several ``--batch-size`` values run
one after the other and end with the time ratios of every variant side by side, per batch size.
The ``faults`` column is the minor page faults of a step (fresh memory touched; on the CPU,
glibc maps blocks over 32 MiB fresh at each allocation, so a large gradient tensor costs ~1
fault per 4 KiB). ``scripts/profile_step.py`` says where the VOC step's extra time goes.

``--setting voc`` benchmarks the multi-label PASCAL VOC setting instead:

    python scripts/bench_step.py --setting voc --batch-size 8 --steps 3 --warmup 1
    OMP_NUM_THREADS=1 python scripts/bench_step.py --setting voc --batch-size 4 8 16 --steps 2 --warmup 1 --timing cpu

a VGG-16 teacher -> the 11-layer student (``vgg11_student``) on 224 x 224 images with 20-class
multi-hot targets holding ``1 + Poisson(0.5)`` positives per image (VOC 2007 averages about 1.5),
BCE + multi-label KD, and maps for every positive (``(B, T)`` targets, -1 padding). The VGG
heads have hidden FC layers, so every map goes through autograd. ``T`` is the largest number of
positives in the benchmark's batches (``task.max_map_targets`` = that count) for the headline
row, and all 20 classes (``task.max_map_targets=null``, the default) for the last row.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.explain import inspect_network, network_spec  # noqa: E402
from distill.models import build_model  # noqa: E402
from distill.module import DistillModule, ExplainSettings, LossWeights  # noqa: E402
from distill.tasks import MulticlassTask, MultilabelTask  # noqa: E402

KD = {"kd": 1.0, "temperature": 4.0}
ALPHA = 0.01  # explanation-loss weight of the paper (Grad-CAM++ §5)

# name -> (loss weights, explain settings); None = the student alone
VARIANTS: dict[str, tuple[LossWeights, ExplainSettings] | None] = {
    "CE only": None,
    "CE + KD": (LossWeights(**KD), ExplainSettings()),
    "CE + KD + Grad-CAM": (LossWeights(**KD, explain=ALPHA), ExplainSettings(method="gradcam")),
    "CE + KD + Grad-CAM++": (LossWeights(**KD, explain=ALPHA), ExplainSettings(method="gradcampp")),
    "CE + KD + Grad-CAM (autograd)": (
        LossWeights(**KD, explain=ALPHA), ExplainSettings(method="gradcam", closed_form=False)),
    "CE + KD + Grad-CAM++ (autograd)": (
        LossWeights(**KD, explain=ALPHA), ExplainSettings(method="gradcampp", closed_form=False)),
}
# VOC setting: name -> (loss weights, explain settings, max_map_targets: "batch" = the batches'
# largest number of positives, None = all classes); None = the student alone.
VOC_VARIANTS: dict[str, tuple[LossWeights, ExplainSettings, str | None] | None] = {
    "CE only": None,
    "CE + KD": (LossWeights(**KD), ExplainSettings(), "batch"),
    "CE + KD + Grad-CAM": (LossWeights(**KD, explain=ALPHA), ExplainSettings(method="gradcam"), "batch"),
    "CE + KD + Grad-CAM++": (LossWeights(**KD, explain=ALPHA), ExplainSettings(method="gradcampp"), "batch"),
    "CE + KD + Grad-CAM++ (T = 20)": (LossWeights(**KD, explain=ALPHA), ExplainSettings(method="gradcampp"), None),
}
VOC_CLASSES = 20
REFERENCE = "CE + KD"
# min: the least-disturbed step, the best estimate of the cost on a machine shared with other
# jobs; median: typical step; cpu: CPU seconds of this process (blind to waiting for a core).
TIMINGS = {"min": "min_time_s", "median": "time_s", "cpu": "cpu_time_s"}
HEADLINE = "CE + KD + Grad-CAM++"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=("cifar", "voc"), default="cifar",
                        help="voc: VGG-16 -> vgg11_student, 224 x 224, multi-label (defaults below change)")
    parser.add_argument("--teacher", default=None, help="default wrn40_2 (voc: vgg16), or timm:<arch>")
    parser.add_argument("--student", default=None, help="default wrn16_2 (voc: vgg11_student); or timm:/torchvision:")
    parser.add_argument("--batch-size", type=int, nargs="+", default=None,
                        help="default 128 (voc: 8); several (4 8 16): one run each, ratios side by side at the end")
    parser.add_argument("--image-size", type=int, default=None, help="default 32 (voc: 224)")
    parser.add_argument("--positives", type=float, default=0.5,
                        help="voc: positives per image are 1 + Poisson(this), mean 1.5 as in VOC 2007")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--device", default="auto", help="auto (cuda if there) | cpu | cuda | cuda:1 ...")
    parser.add_argument("--precision", choices=("32", "bf16"), default="32",
                        help="bf16: the step under torch.autocast(bfloat16), as trainer.precision=bf16-mixed")
    parser.add_argument("--timing", choices=tuple(TIMINGS), default="min",
                        help="which figure the ratios on the last two lines use (all are printed)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    voc = args.setting == "voc"
    defaults = {"teacher": ("wrn40_2", "vgg16"), "student": ("wrn16_2", "vgg11_student"),
                "batch_size": ([128], [8]), "image_size": (32, 224)}
    for key, (cifar, voc_value) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, voc_value if voc else cifar)
    return args


def network(spec: str, num_classes: int, image_size: int) -> nn.Module:
    """``wrn40_2`` or ``timm:<arch>`` / ``torchvision:<arch>``, with its head measured (as train.py does)."""
    name, _, arch = spec.partition(":")
    model = build_model(name, num_classes, **({"arch": arch} if arch else {}))
    inspect_network(model, torch.randn(2, 3, image_size, image_size))
    return model


def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


class Step:
    """One variant: its own copy of the student (same initial weights) and its own optimizer."""

    def __init__(self, name: str, student: nn.Module, teacher: nn.Module,
                 spec: tuple[LossWeights, ExplainSettings] | None, task=None) -> None:
        self.name = name
        self.student = copy.deepcopy(student).train()
        self.optimizer = optimizer_for(self.student)
        self.task = task or MulticlassTask(10)
        self.module = None
        if spec is not None:
            weights, explain = spec
            self.module = DistillModule(self.student, teacher, optimizer=optimizer_for, weights=weights,
                                        explain=explain, task=self.task)
            self.module.train()
        self.times: list[float] = []  # wall-clock seconds
        self.cpu_times: list[float] = []  # CPU seconds of this process (all threads)
        self.faults: list[int] = []  # minor page faults (fresh memory touched)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        if self.module is None:
            return self.task.loss(self.student(x), y)
        terms, _ = self.module.loss_terms(x, y)
        return self.module.total_loss(terms)

    def __call__(self, x: Tensor, y: Tensor, autocast: Callable[[], contextlib.AbstractContextManager]) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = self.loss(x, y)
        loss.backward()
        self.optimizer.step()
        return loss


def multi_hot(batch: int, extra: float, gen: torch.Generator) -> Tensor:
    """``(batch, 20)`` 0/1 targets with ``1 + Poisson(extra)`` distinct positives per image (at most 20)."""
    counts = (1 + torch.poisson(torch.full((batch,), float(extra)), generator=gen)).clamp_max(VOC_CLASSES).long()
    order = torch.rand(batch, VOC_CLASSES, generator=gen).argsort(dim=1)
    rank = order.argsort(dim=1)  # a random rank per class
    return (rank < counts[:, None]).long()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_bytes(step: Step, x: Tensor, y: Tensor, autocast, exclude: set[int] = frozenset()) -> int:
    """Bytes of the distinct storages saved for backward during one forward (incl. inner grads),
    leaving out the storages whose ``data_ptr`` is in ``exclude`` (e.g. the parameters)."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    step.optimizer.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        loss = step.loss(x, y)
    loss.backward()
    step.optimizer.zero_grad(set_to_none=True)
    return sum(n for ptr, n in storages.items() if ptr not in exclude)


def parameter_storages(*models: nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}


def peak_bytes(step: Step, x: Tensor, y: Tensor, autocast, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step(x, y, autocast)
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def main(argv: list[str] | None = None) -> dict:
    """Results per variant for one ``--batch-size``; ``{batch size: results}`` for several."""
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    classes = VOC_CLASSES if args.setting == "voc" else 10
    teacher = network(args.teacher, classes, args.image_size).to(device).eval().requires_grad_(False)
    student = network(args.student, classes, args.image_size).to(device)
    print(f"map paths: teacher {network_spec(teacher).path}, student {network_spec(student).path}")
    by_batch = {}
    for batch_size in args.batch_size:
        by_batch[batch_size] = run(args, batch_size, teacher, student, device)
        print()
    if len(by_batch) > 1:
        key = TIMINGS[args.timing]
        names = [name for name in next(iter(by_batch.values())) if name != REFERENCE]
        print(f"x CE + KD ({args.timing} step time) by batch size")
        print(f"{'batch':>5s}" + "".join(f" {name.removeprefix('CE + KD + '):>26s}" for name in names))
        for batch_size, results in by_batch.items():
            ref = results[REFERENCE][key]
            print(f"{batch_size:5d}" + "".join(f" {results[name][key] / ref:26.3f}" for name in names))
        return by_batch
    return next(iter(by_batch.values()))


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows has no resource module
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run(args: argparse.Namespace, batch_size: int, teacher: nn.Module, student: nn.Module,
        device: torch.device) -> dict[str, dict[str, float]]:
    """Every variant on the same ``batch_size`` batches; prints the table and returns its rows."""
    voc = args.setting == "voc"
    gen = torch.Generator().manual_seed(args.seed)
    shape = (batch_size, 3, args.image_size, args.image_size)
    labels = [multi_hot(batch_size, args.positives, gen) if voc else
              torch.randint(0, 10, (batch_size,), generator=gen) for _ in range(args.warmup + args.steps)]
    batches = [(torch.randn(shape, generator=gen).to(device), y.to(device)) for y in labels]
    if voc:
        widest = max(int(y.sum(dim=1).max()) for y in labels)
        steps = [Step(name, student, teacher, None if spec is None else spec[:2],
                      MultilabelTask(VOC_CLASSES, None if spec is None or spec[2] is None else widest))
                 for name, spec in VOC_VARIANTS.items()]
        mean_positives = sum(float(y.sum()) for y in labels) / sum(len(y) for y in labels)
        print(f"multi-label: {mean_positives:.2f} positives per image on average, at most {widest} in a batch "
              f"(maps per image T = {widest}; last row T = {VOC_CLASSES})")
    else:
        steps = [Step(name, student, teacher, spec) for name, spec in VARIANTS.items()]
    if args.precision == "bf16":
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.teacher} -> {args.student}, batch {batch_size}, {args.image_size}x{args.image_size}, "
          f"precision {args.precision}, device {device} ({where}), torch {torch.__version__}")
    print(f"{args.warmup} warm-up + {args.steps} timed steps per variant, round-robin")

    for i, (x, y) in enumerate(batches):
        order = steps[i % len(steps):] + steps[: i % len(steps)]
        for step in order:
            synchronize(device)
            start, cpu_start, faults = time.perf_counter(), time.process_time(), minor_faults()
            step(x, y, autocast)
            synchronize(device)
            if i >= args.warmup:
                step.times.append(time.perf_counter() - start)
                step.cpu_times.append(time.process_time() - cpu_start)
                step.faults.append(minor_faults() - faults)

    x, y = batches[0]
    results: dict[str, dict[str, float]] = {}
    for step in steps:
        results[step.name] = {
            "time_s": statistics.median(step.times),
            "min_time_s": min(step.times),
            "cpu_time_s": statistics.median(step.cpu_times),
            "page_faults": statistics.median(step.faults),
            "saved_bytes": saved_bytes(step, x, y, autocast),
            # Without the parameters: VGG-16's FC head (119 M parameters) is saved by the teacher's
            # map gradient, but it is memory the teacher holds anyway.
            "saved_bytes_no_params": saved_bytes(step, x, y, autocast, parameter_storages(step.student, teacher)),
        }
        peak = peak_bytes(step, x, y, autocast, device)
        if peak is not None:
            results[step.name]["peak_bytes"] = peak

    ref = results[REFERENCE]
    header = (f"{'step':34s} {'median ms':>9s} {'x KD':>6s} {'min ms':>9s} {'x KD':>6s} {'cpu ms':>9s} "
              f"{'x KD':>6s} {'saved MiB':>10s} {'x KD':>6s} {'no params':>10s} {'x KD':>6s} {'faults':>8s}")
    has_peak = "peak_bytes" in ref
    if has_peak:
        header += f" {'peak MiB':>9s} {'x KD':>6s}"
    header += f" {'images/s':>9s}"
    print(header)
    for name, r in results.items():
        line = "".join(f"{1e3 * r[k]:9.1f} {r[k] / ref[k]:6.3f} " for k in ("time_s", "min_time_s", "cpu_time_s"))
        line = (f"{name:34s} {line}"
                f"{r['saved_bytes'] / 2**20:10.1f} {r['saved_bytes'] / ref['saved_bytes']:6.3f} "
                f"{r['saved_bytes_no_params'] / 2**20:10.1f} "
                f"{r['saved_bytes_no_params'] / ref['saved_bytes_no_params']:6.3f} {r['page_faults']:8.0f}")
        if has_peak:
            line += f" {r['peak_bytes'] / 2**20:9.1f} {r['peak_bytes'] / ref['peak_bytes']:6.3f}"
        print(f"{line} {batch_size / r['time_s']:9.0f}")  # images/s of the median step
    key = TIMINGS[args.timing]
    print(f"ratios below: {args.timing} step time; memory = bytes saved for backward")
    if voc:
        padded = results[HEADLINE + f" (T = {VOC_CLASSES})"]
        print(f"T = batch max vs T = {VOC_CLASSES} (Grad-CAM++): time x{results[HEADLINE][key] / padded[key]:.3f}, "
              f"memory x{results[HEADLINE]['saved_bytes'] / padded['saved_bytes']:.3f}")
    else:
        closed, forced = results[HEADLINE], results[HEADLINE + " (autograd)"]
        print(f"closed form vs forced autograd (Grad-CAM++): time x{closed[key] / forced[key]:.3f}, "
              f"memory x{closed['saved_bytes'] / forced['saved_bytes']:.3f}")
    head = results[HEADLINE]
    print(f"explain/kd time ratio: {head[key] / ref[key]:.3f}  "
          f"memory ratio: {head['saved_bytes'] / ref['saved_bytes']:.3f}  "
          f"(without parameters: {head['saved_bytes_no_params'] / ref['saved_bytes_no_params']:.3f})")
    return results


if __name__ == "__main__":
    main()
