"""Host time of the student's weight casts and gradient hand-over per iteration: autocast's
cached cast (``runtime.precision.cast_once``) against ``training.shadows.GradShadow``, on a
stack of small linear layers (the kernels are tiny, so the time is mostly dispatch, Python and,
on CUDA, launches), with the iteration's forwards and backward passes as the trainer runs them.

    python benchmarks/bench_grad_shadow.py [--layers 362] [--passes 3] [--iters 20] [--device cpu]

362 layers have 724 weights and biases, as MiT-B5 with its head has convolutions and linears.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from domainmerge.runtime.precision import cast_once
from domainmerge.training.shadows import GradShadow


def iteration(net: nn.Module, x: torch.Tensor, shadow: GradShadow | None, passes: int) -> None:
    for p in net.parameters():
        p.grad = None
    region = shadow.swapped() if shadow is not None else cast_once(x.device, "bf16")
    with region:
        for _ in range(passes):
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                y = net(x)
            y.float().sum().backward()
            if shadow is not None:
                shadow.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=362)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    net = nn.Sequential(*[nn.Linear(8, 8) for _ in range(args.layers)]).to(device)
    x = torch.randn(2, 8, device=device)
    shadow = GradShadow(net, torch.bfloat16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"{args.layers} linear layers ({2 * args.layers} tensors), {args.passes} passes, {device}, "
          f"torch {torch.__version__}")
    print("| form | ms/iter |\n|:--|--:|")
    for _ in range(args.rounds):
        for name, form in (("cached casts", None), ("GradShadow", shadow)):
            for _ in range(3):
                iteration(net, x, form, args.passes)
            sync()
            start = time.perf_counter()
            for _ in range(args.iters):
                iteration(net, x, form, args.passes)
            sync()
            print(f"| {name} | {(time.perf_counter() - start) / args.iters * 1e3:.1f} |")


if __name__ == "__main__":
    main()
