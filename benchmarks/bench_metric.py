"""Throughput of SegMetric.update against torchmetrics on the same label maps (CPU).

    python benchmarks/bench_metric.py [--batch 8] [--height 512] [--width 1024] [--repeats 5]

Prints a Markdown table of million pixels per second (best of the repeats) and checks that
both give the same confusion matrix.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

from domainmerge.evaluation.metrics import SegMetric
from domainmerge.reporting import markdown_table


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()   # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.height, args.width)
    target = torch.randint(0, args.classes, shape, generator=gen)
    target[torch.rand(shape, generator=gen) < 0.1] = 255   # ~10% ignored, as in Cityscapes
    pred = torch.randint(0, args.classes, shape, generator=gen)
    pixels = target.numel()

    def ours(p: torch.Tensor, t: torch.Tensor) -> Callable[[], object]:
        def step() -> object:
            metric = SegMetric(args.classes)
            metric.update(p, t)
            return metric.confusion
        return step

    def theirs(validate: bool) -> Callable[[], object]:
        def step() -> object:
            metric = MulticlassJaccardIndex(args.classes, average="macro", ignore_index=255,
                                            validate_args=validate)
            metric.update(pred, target)
            return metric.confmat
        return step

    reference = MulticlassConfusionMatrix(args.classes, ignore_index=255)
    reference.update(pred, target)
    assert torch.equal(ours(pred, target)().cpu(), reference.compute().to(torch.int64))

    cases = [
        ("SegMetric.update, int64 maps", ours(pred, target)),
        ("SegMetric.update, uint8 maps", ours(pred.to(torch.uint8), target.to(torch.uint8))),
        ("torchmetrics MulticlassJaccardIndex (validate_args=True)", theirs(True)),
        ("torchmetrics MulticlassJaccardIndex (validate_args=False)", theirs(False)),
    ]
    rows = []
    for name, fn in cases:
        seconds = best_seconds(fn, args.repeats)
        rows.append([name, f"{seconds * 1000:.1f}", f"{pixels / seconds / 1e6:.1f}"])
    print(f"{args.batch} x {args.height}x{args.width} label maps, {args.classes} classes, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)\n")
    print(markdown_table(["Method", "ms per batch", "Mpixel/s"], rows))


if __name__ == "__main__":
    main()
