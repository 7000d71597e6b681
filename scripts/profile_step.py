"""Where the time of one VOC (multi-label) distillation step goes: CE + KD against explanation steps.

    OMP_NUM_THREADS=1 python scripts/profile_step.py --batch-size 4 --weight-ops
    OMP_NUM_THREADS=1 python scripts/profile_step.py --batch-size 8 --variants "CE + KD" "CE + KD + Grad-CAM++"

The same networks, targets and steps as ``bench_step.py --setting voc`` (VGG-16 -> vgg11_student
at 224 x 224, ``1 + Poisson(0.5)`` positives, ``T`` = the batches' largest count). Each variant
runs ``--warmup`` untimed steps, then ``--steps`` steps, each under ``torch.profiler`` (CPU),
round-robin with the other variants; the figures are medians. Every op's self CPU time is
charged to a phase:

- forward: the innermost ``record_function`` label around it (teacher / student backbone and
  head, the maps of each network, the rest of the loss terms);
- backward: the phase of the forward op that created the autograd node it evaluates (matched
  by the node's sequence number), e.g. ``backward of student maps`` is the double backward.

The profiler's durations are wall-clock; on a shared CPU they are scaled per step to the
step's CPU time (the factor is printed). The tables: the phases, per variant, with the
difference to the first variant; the same time by the tensors an op works on (5-D map
tensors; the teacher's and the student's weight-sized 2-D tensors: their FC weights or the
gradients of these; other 2-D; 4-D conv activations); the ops (name and input shapes) whose
self CPU time differs most. The FC layers are recognisable by their shapes (VGG-16's fc6
weight is ``[4096, 25088]``, the student's ``[688, 25088]``). The minor page faults per step
count fresh memory touched (a new 69 MB student fc6 gradient is ~17 k of them).
"""

from __future__ import annotations

import argparse
import functools
import resource
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_step  # noqa: E402

from distill.explain import inspect_network  # noqa: E402
from distill.models import build_model  # noqa: E402
from distill.tasks import MultilabelTask  # noqa: E402

PHASES = ("teacher backbone", "teacher head", "student backbone", "student head", "teacher maps",
          "student maps", "loss terms (rest)", "optimizer")


def labelled(fn, label: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapper


def instrument(step: bench_step.Step, teacher: torch.nn.Module) -> None:
    """Put phase labels around the methods one training step calls (instance attributes only)."""
    student, module = step.student, step.module
    student.forward_features = labelled(student.forward_features, "student backbone")
    student.forward_head = labelled(student.forward_head, "student head")
    if module is not None:
        maps = module.maps

        def labelled_maps(model, *args, **kwargs):
            with record_function("teacher maps" if model is teacher else "student maps"):
                return maps(model, *args, **kwargs)

        module.maps = labelled_maps
        module.loss_terms = labelled(module.loss_terms, "loss terms (rest)")
    step.optimizer.step = labelled(step.optimizer.step, "optimizer")


def instrument_teacher(teacher: torch.nn.Module) -> None:
    teacher.forward_features = labelled(teacher.forward_features, "teacher backbone")
    teacher.forward_head = labelled(teacher.forward_head, "teacher head")


def phase_times(events) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """Self CPU microseconds per phase, and per (op name, input shapes)."""
    labels = set(PHASES)
    def innermost(event) -> str | None:
        parent = event
        while parent is not None:
            if parent.name in labels:
                return parent.name
            parent = parent.cpu_parent
        return None

    # forward nodes: sequence number -> phase of the op that created them
    created: dict[int, str] = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::engine"):
            phase = innermost(e)
            if phase is not None and "backward" not in phase:
                created.setdefault(e.sequence_nr, phase)
    phases: dict[str, float] = defaultdict(float)
    ops: dict[tuple[str, str], float] = defaultdict(float)
    for e in events:
        if e.name in labels or e.self_cpu_time_total == 0:
            continue
        phase, parent = None, e
        while parent is not None:  # the innermost label, or the engine node that ran it
            if parent.name in labels:
                phase = parent.name
                break
            if parent.name.startswith("autograd::engine::evaluate_function"):
                origin = created.get(parent.sequence_nr, "?")
                phase = f"backward of {origin}" if innermost(parent) is None else f"{innermost(parent)} (inner grad)"
                break
            parent = parent.cpu_parent
        phase = phase or "other"
        phases[phase] += e.self_cpu_time_total
        ops[(e.name, str(e.input_shapes))] += e.self_cpu_time_total
    return phases, ops


WEIGHT_SIZED = 4_000_000  # elements: VGG-16's fc6 / fc7 and the student's fc6 weights are larger, conv weights smaller
KINDS = ("maps: 5-D (B, T, K, h, w) tensors", "teacher FC: its weight-sized fc weights (read)",
         "student FC: its weight-sized fc weights or their gradients", "FC: other 2-D",
         "conv / BN / ReLU / pool: 4-D", "other")


def big_weights(model: torch.nn.Module) -> set[tuple[int, int]]:
    """Shapes (and their transposes) of the model's 2-D parameters with >= WEIGHT_SIZED elements."""
    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2 and p.numel() >= WEIGHT_SIZED}
    return shapes | {s[::-1] for s in shapes}


def kind(name: str, shapes: str, teacher: set, student: set) -> str:
    """Which part of the network an op works on, from its input shapes (``teacher`` / ``student``:
    ``big_weights`` of each network)."""
    shapes = eval(shapes)  # noqa: S307 - the profiler's own repr of nested lists of ints
    dims = [tuple(s) for s in shapes if isinstance(s, list) and s and all(isinstance(d, int) for d in s)]
    if any(len(s) == 5 for s in dims):
        return KINDS[0]
    two = [s for s in dims if len(s) == 2]
    if name in ("aten::mm", "aten::addmm") and len(two) >= 2:
        two.append((two[-2][0], two[-1][1]))  # the product's shape, e.g. a weight gradient
    if any(s in teacher for s in two):
        return KINDS[1]
    if any(s in student for s in two):
        return KINDS[2]
    if any(len(s) == 4 for s in dims):
        return KINDS[4]
    return KINDS[3] if two else KINDS[5]


def weight_op_costs(batch: int, rows: int, repeats: int = 5) -> None:
    """The FC ops of the maps alone, CPU ms (min over ``repeats``), page faults per call: into a
    fresh output (as autograd allocates) and into a preallocated one (no page faults)."""
    def cost(fn) -> tuple[float, float]:
        fn()
        times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(repeats):
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
        return 1e3 * min(times), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / repeats

    teacher_w, student_w = torch.randn(4096, 25088), torch.randn(688, 25088)
    out, out_t = torch.empty(688, 25088), torch.empty(25088, 688)
    grads, inputs = torch.randn(688, rows), torch.randn(rows, 25088)
    cases = {
        f"teacher fc6 forward  [{batch}, 25088] @ W.t() (411 MB read)":
            (lambda: torch.randn(batch, 25088) @ teacher_w.t(), None),
        f"teacher fc6 inner gradient  [{rows}, 4096] @ W (411 MB read)":
            (lambda: torch.randn(rows, 4096) @ teacher_w, None),
        f"student fc6 weight gradient  [688, {rows}] @ [{rows}, 25088] (69 MB written)":
            (lambda: torch.mm(grads, inputs), lambda: torch.mm(grads, inputs, out=out)),
        "student fc6 gradient accumulation  [688, 25088] + [688, 25088]":
            (lambda: student_w + student_w, lambda: torch.add(student_w, student_w, out=out)),
        "the same, one operand transposed  [25088, 688] + W.t()":
            (lambda: out_t + student_w.t(), lambda: torch.add(out_t, student_w.t(), out=out_t)),
    }
    print("\nFC ops of the maps alone (CPU ms, minor page faults per call): fresh output | preallocated")
    for name, (fresh, reused) in cases.items():
        line = "{:.1f} ms {:.0f} faults".format(*cost(fresh))
        if reused is not None:
            line += " | {:.1f} ms {:.0f} faults".format(*cost(reused))
        print(f"  {name:72s} {line}")


def median_run(runs: list[dict]) -> dict:
    """Per phase / op / figure, the median over the profiled steps."""
    keys = {"phases": {k for r in runs for k in r["phases"]}, "ops": {k for r in runs for k in r["ops"]}}
    out = {part: {k: statistics.median(r[part].get(k, 0.0) for r in runs) for k in names}
           for part, names in keys.items()}
    out.update({k: statistics.median(r[k] for r in runs) for k in ("cpu_s", "faults", "sys_s", "scale")})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--positives", type=float, default=0.5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per variant (medians)")
    parser.add_argument("--variants", nargs="+", default=["CE + KD", "CE + KD + Grad-CAM", "CE + KD + Grad-CAM++"],
                        choices=list(bench_step.VOC_VARIANTS), help="the first is the reference")
    parser.add_argument("--teacher", default="vgg16")
    parser.add_argument("--student", default="vgg11_student")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--student-dropout", type=float, default=None,
                        help="the student's head dropout (vgg11_student: 0.5); 0 drops the dropout-off map-head pass")
    parser.add_argument("--weight-ops", action="store_true",
                        help="then time the maps' FC ops alone (VGG-16 / vgg11_student shapes), fresh vs "
                             "preallocated output (page faults)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    classes = bench_step.VOC_CLASSES
    teacher = bench_step.network(args.teacher, classes, args.image_size).eval().requires_grad_(False)
    if args.student_dropout is None:
        student = bench_step.network(args.student, classes, args.image_size)
    else:  # dropout 0: a deterministic head, so the maps reuse the training logits (no map-head pass)
        student = build_model(args.student, classes, dropout=args.student_dropout)
        inspect_network(student, torch.randn(2, 3, args.image_size, args.image_size))
    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    labels = [bench_step.multi_hot(args.batch_size, args.positives, gen) for _ in range(args.warmup + args.steps)]
    batches = [(torch.randn(shape, generator=gen), y) for y in labels]
    widest = max(int(y.sum(dim=1).max()) for y in labels)
    print(f"{args.teacher} -> {args.student}, batch {args.batch_size}, {args.image_size}x{args.image_size}, "
          f"T = {widest}, cpu {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    instrument_teacher(teacher)
    steps = []
    for name in args.variants:
        spec = bench_step.VOC_VARIANTS[name]
        steps.append(bench_step.Step(name, student, teacher, None if spec is None else spec[:2],
                                     MultilabelTask(classes, None if spec is None or spec[2] is None else widest)))
        instrument(steps[-1], teacher)
    runs: dict[str, list] = defaultdict(list)
    for i, (x, y) in enumerate(batches):  # round-robin, the order rotating, as bench_step.py does
        for step in steps[i % len(steps):] + steps[: i % len(steps)]:
            if i < args.warmup:
                step(x, y, _null)
                continue
            usage, cpu = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                step(x, y, _null)
            cpu, after = time.process_time() - cpu, resource.getrusage(resource.RUSAGE_SELF)
            phases, ops = phase_times(prof.events())
            # The profiler's durations are wall-clock, which waiting for a shared core inflates:
            # scale them to the step's CPU time (as if the waiting were spread evenly).
            scale = 1e6 * cpu / sum(phases.values())
            phases = {k: v * scale for k, v in phases.items()}
            ops = {k: v * scale for k, v in ops.items()}
            runs[step.name].append({"phases": phases, "ops": ops, "cpu_s": cpu, "scale": scale,
                                    "faults": after.ru_minflt - usage.ru_minflt,
                                    "sys_s": after.ru_stime - usage.ru_stime})
    results = {name: median_run(runs[name]) for name in args.variants}
    print(f"{args.steps} profiled step(s) per variant after {args.warmup} warm-up, medians; "
          "minor page faults and kernel (sys) CPU time per step from getrusage")
    for name, r in results.items():
        print(f"  {name:34s} step {1e3 * r['cpu_s']:7.0f} CPU ms (profiler times x{r['scale']:.2f}),"
              f" {r['faults']:8.0f} page faults, {1e3 * r['sys_s']:6.0f} ms sys")

    ref_name = args.variants[0]
    ref = results[ref_name]
    names = sorted({p for r in results.values() for p in r["phases"]},
                   key=lambda p: -max(r["phases"].get(p, 0) for r in results.values()))
    print(f"\nself CPU ms per phase (difference to {ref_name})")
    print(f"{'phase':44s}" + "".join(f" {n[-22:]:>22s} {'diff':>7s}" for n in args.variants))
    for phase in names + ["total"]:
        row = f"{phase:44s}"
        for n in args.variants:
            value = sum(results[n]["phases"].values()) if phase == "total" else results[n]["phases"].get(phase, 0)
            base = sum(ref["phases"].values()) if phase == "total" else ref["phases"].get(phase, 0)
            row += f" {value / 1e3:22.1f} {(value - base) / 1e3:+7.1f}"
        print(row)
    kinds = {n: defaultdict(float) for n in args.variants}
    for n in args.variants:
        for (op, shapes), value in results[n]["ops"].items():
            kinds[n][kind(op, shapes, big_weights(teacher), big_weights(student))] += value
    print(f"\nself CPU ms by the tensors an op works on (difference to {ref_name})")
    print(f"{'kind':66s}" + "".join(f" {n[-22:]:>22s} {'diff':>7s}" for n in args.variants))
    for k in KINDS:
        print(f"{k:66s}" + "".join(f" {kinds[n][k] / 1e3:22.1f} {(kinds[n][k] - kinds[ref_name][k]) / 1e3:+7.1f}"
                                   for n in args.variants))
    for n in args.variants[1:]:
        total = sum(ref["phases"].values())
        print(f"{n}: x{sum(results[n]['phases'].values()) / total:.3f} of {ref_name} (ops' self CPU), "
              f"x{results[n]['cpu_s'] / ref['cpu_s']:.3f} (step CPU time)")
    for n in args.variants[1:]:
        ops = results[n]["ops"]
        keys = set(ops) | set(ref["ops"])
        diffs = sorted(keys, key=lambda k: -abs(ops.get(k, 0) - ref["ops"].get(k, 0)))[: args.top]
        print(f"\nops whose self CPU differs most, {n} vs {ref_name} (ms)")
        print(f"{'op':28s} {'input shapes':70s} {'ref':>8s} {'this':>8s} {'diff':>8s}")
        for k in diffs:
            a, b = ref["ops"].get(k, 0) / 1e3, ops.get(k, 0) / 1e3
            print(f"{k[0][:28]:28s} {k[1][:70]:70s} {a:8.1f} {b:8.1f} {b - a:+8.1f}")
    if args.weight_ops:
        weight_op_costs(args.batch_size, args.batch_size * widest)
    return results


def _null():
    import contextlib
    return contextlib.nullcontext()


if __name__ == "__main__":
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    main()
