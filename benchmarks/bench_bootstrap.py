"""Time of the bootstrap over images: R resamples of N images x C classes (CPU, numpy).

    python benchmarks/bench_bootstrap.py [--images 500] [--classes 19] [--resamples 1000] [--repeats 5]

Prints a Markdown table (best of the repeats): drawing the [R, N] count matrix, one model's
mIoU interval, the paired difference of two models, and H with its interval over two domains
of N images each (two models, paired).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from domainmerge.evaluation.bootstrap import compare, interval, paired_difference, resample_counts
from domainmerge.evaluation.metrics import ImageStats
from domainmerge.reporting import markdown_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_metric import best_seconds  # noqa: E402  (one timing helper for the benchmarks)


def fake_stats(rng: np.random.Generator, n: int, c: int) -> ImageStats:
    """Counts of the size a 1024 x 2048 Cityscapes image gives (about 2M labelled pixels)."""
    union = rng.integers(0, 200_000, size=(n, c))
    return ImageStats(intersection=(union * rng.random((n, c))).astype(np.int64), union=union, target=union)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n, c, r = args.images, args.classes, args.resamples
    a, b = fake_stats(rng, n, c), fake_stats(rng, n, c)
    a2, b2 = fake_stats(rng, n, c), fake_stats(rng, n, c)
    cases = {
        "count matrix [R, N]": lambda: resample_counts(n, r, np.random.default_rng(1)),
        "mIoU interval (one model)": lambda: interval(a, resamples=r),
        "paired difference (two models)": lambda: paired_difference(a, b, resamples=r),
        "compare 2 models x 2 domains (mIoU, H, differences)": lambda: compare(
            {"a": {"x": a, "y": a2}, "b": {"x": b, "y": b2}}, resamples=r),
    }
    rows = [[name, f"{best_seconds(fn, args.repeats) * 1000:.1f}"] for name, fn in cases.items()]
    print(f"{n} images x {c} classes x {r} resamples, best of {args.repeats}")
    print(markdown_table(["operation", "time (ms)"], rows))


if __name__ == "__main__":
    main()
