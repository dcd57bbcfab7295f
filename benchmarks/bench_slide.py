"""Sliding-window inference: windows one per forward (domainmerge before batched slide) against
all windows of the image in one forward (``inference.predict`` now, as the authors'
``batched_slide`` in HRDA's test configs).

Default: HRDA with a MiT-B0 backbone (random weights) on one 1024x2048 image, windows 1024 and
512 with stride 512 (the authors' Cityscapes and IDD/ACDC test settings), fp32; each setting is
timed ``--repeats`` times after ``--warmup`` untimed runs and the medians of wall and CPU time
are printed, with the two outputs' largest difference (float32 rounding only).

    python benchmarks/bench_slide.py [--arch hrda_mitb0] [--size 1024 2048] [--crops 1024 512]
        [--stride 512] [--repeats 2] [--warmup 1] [--device cpu] [--threads N]

Prints one Markdown row per window size. Measured on the project's 2-core CPU while other jobs
kept the load average at 9-14 (``--repeats 1 --warmup 0``): window 1024, 3 windows: 515.8 s wall
/ 131.3 s CPU one per forward, 595.4 / 135.8 batched (ratio 1.15 wall, 1.03 CPU); window 512,
8 windows: 135.4 / 43.3 against 91.6 / 44.5 (0.68 wall, 1.03 CPU); outputs equal to 9e-8. On a
CPU the work is the same either way (CPU time within 3%); the wall times there are contention.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from domainmerge.evaluation.inference import predict
from domainmerge.models import build_model


def seconds(model: torch.nn.Module, x: torch.Tensor, crop: int, stride: int, max_batch: int | None,
            repeats: int, warmup: int) -> tuple[float, float, torch.Tensor]:
    """Median wall time and median CPU time of this process (all threads) of ``predict`` in
    slide mode, and its logits. CPU time is the fairer figure on a machine shared with other
    jobs: waiting for a core does not count."""
    def run() -> torch.Tensor:
        out = predict(model, x, "slide", (crop, crop), (stride, stride), max_batch=max_batch)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        return out

    for _ in range(warmup):
        run()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = run()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="hrda_mitb0")
    parser.add_argument("--size", nargs=2, type=int, default=[1024, 2048], metavar=("H", "W"))
    parser.add_argument("--crops", nargs="+", type=int, default=[1024, 512])
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args.arch).eval().to(device)
    x = torch.randn(1, 3, *args.size, device=device)
    predict(model, x[:, :, :256, :256], "whole")  # first-call overheads, outside every timing
    print(f"{args.arch}, image {args.size[0]}x{args.size[1]}, stride {args.stride}, fp32 on {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, median of {args.repeats} "
          f"after {args.warmup} warm-up; wall / CPU seconds")
    print("| window | windows | one per forward (s) | all in one forward (s) | batched / unbatched (wall, CPU) "
          "| max abs diff |")
    print("|--:|--:|--:|--:|--:|--:|")
    for crop in args.crops:
        rows = max(args.size[0] - crop + args.stride - 1, 0) // args.stride + 1
        cols = max(args.size[1] - crop + args.stride - 1, 0) // args.stride + 1
        w_one, c_one, a = seconds(model, x, crop, args.stride, 1, args.repeats, args.warmup)
        w_all, c_all, b = seconds(model, x, crop, args.stride, None, args.repeats, args.warmup)
        diff = float((a - b).abs().max())
        print(f"| {crop} | {rows * cols} | {w_one:.1f} / {c_one:.1f} | {w_all:.1f} / {c_all:.1f} "
              f"| {w_all / w_one:.2f}, {c_all / c_one:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
