"""Inference throughput: images per second of a full-size network, whole-image inference.

Default: MiT-B5 + DAFormer head (85.2M parameters, random weights) on 512x1024 inputs, the
resolution DAFormer evaluates Cityscapes at, on the CPU and, when one is present, on CUDA
(fp32 and bf16/fp16 autocast). Timing covers ``inference.predict`` (forward pass plus the
bilinear resize of the logits to the image size), after warm-up.

    python benchmarks/bench_inference.py [--arch daformer_mitb5] [--size 512 1024] [--batch-size 1]
        [--iters 3] [--devices cpu cuda] [--threads N]

Prints one Markdown row per (device, precision).
"""

from __future__ import annotations

import argparse
import time

import torch

from domainmerge.evaluation.inference import predict
from domainmerge.models import build_model


def images_per_second(model: torch.nn.Module, device: torch.device, size: tuple[int, int], batch: int,
                      iters: int, amp: str | None) -> float:
    x = torch.randn(batch, 3, *size, device=device)
    predict(model, x, "whole", amp=amp)  # warm-up (allocations, cuDNN autotune)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        predict(model, x, "whole", amp=amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="daformer_mitb5")
    parser.add_argument("--size", nargs=2, type=int, default=[512, 1024], metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args.arch).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.arch}: {n_params:,} parameters, input {args.size[0]}x{args.size[1]}, "
          f"batch {args.batch_size}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print("| device | precision | images/s | s/image |")
    print("|:--|:--|--:|--:|")
    for name in args.devices:
        if name == "cuda" and not torch.cuda.is_available():
            print("| cuda | - | (no CUDA device) | |")
            continue
        device = torch.device(name)
        model.to(device)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        precisions = [None, "bf16", "fp16"] if device.type == "cuda" else [None]
        iters = args.iters if device.type == "cpu" else max(args.iters, 20)
        for amp in precisions:
            ips = images_per_second(model, device, tuple(args.size), args.batch_size, iters, amp)
            print(f"| {label} | {amp or 'fp32'} | {ips:.2f} | {1 / ips:.3f} |", flush=True)


if __name__ == "__main__":
    main()
