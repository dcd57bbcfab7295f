"""Weight matching time on ResNet-50 / ResNet-101 sized ResNetV1c state dicts (random weights).

B is A with every backbone permutation applied at random, plus Gaussian noise; we report the
wall time of `align_state_dicts`, the fraction of units where the permutation was recovered,
and, as a control, the identity fraction when B is A plus noise without permuting (the paper's
shared-init situation). Target: ResNet-101 under 10 s.

    python benchmarks/bench_alignment.py [--depth 50 101] [--noise 0.1] [--bare]

--bare drops the decode head, so the stage streams are permuted too (one fc-less bare backbone
keeps only its last stage fixed): more and larger permutations, the harder case.
"""

from __future__ import annotations

import argparse
import time

import torch

from domainmerge.alignment.matching import align_state_dicts, apply_permutation, weight_matching
from domainmerge.alignment.spec import spec_from_state_dict

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def resnetv1c_state_dict(depth: int, *, head: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keys and shapes of mmseg ResNetV1c-`depth` (+ a small decode head), He-initialised."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        sd[f"backbone.{name}.weight"] = torch.randn(cout, cin, k, k, generator=gen) * (2 / (cin * k * k)) ** 0.5

    def bn(name: str, c: int) -> None:
        sd[f"backbone.{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=gen)
        sd[f"backbone.{name}.bias"] = 0.1 * torch.randn(c, generator=gen)
        sd[f"backbone.{name}.running_mean"] = 0.1 * torch.randn(c, generator=gen)
        sd[f"backbone.{name}.running_var"] = 0.5 + torch.rand(c, generator=gen)
        sd[f"backbone.{name}.num_batches_tracked"] = torch.tensor(1000)

    conv("stem.0", 32, 3, 3), bn("stem.1", 32)
    conv("stem.3", 32, 32, 3), bn("stem.4", 32)
    conv("stem.6", 64, 32, 3), bn("stem.7", 64)
    cin = 64
    for s, blocks in enumerate(DEPTHS[depth], start=1):
        mid = 64 * 2 ** (s - 1)
        for b in range(blocks):
            p = f"layer{s}.{b}"
            conv(f"{p}.conv1", mid, cin, 1), bn(f"{p}.bn1", mid)
            conv(f"{p}.conv2", mid, mid, 3), bn(f"{p}.bn2", mid)
            conv(f"{p}.conv3", 4 * mid, mid, 1), bn(f"{p}.bn3", 4 * mid)
            if b == 0:
                conv(f"{p}.downsample.0", 4 * mid, cin, 1), bn(f"{p}.downsample.1", 4 * mid)
            cin = 4 * mid
    if head:
        sd["decode_head.conv_seg.weight"] = torch.randn(19, 256, 1, 1, generator=gen)
    return sd


def noisy(sd: dict[str, torch.Tensor], scale: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Add Gaussian noise of ``scale`` times each weight tensor's std (statistics untouched)."""
    return {k: v + scale * v.std() * torch.randn(v.shape, generator=gen)
            if v.is_floating_point() and v.numel() > 1 and "running" not in k else v
            for k, v in sd.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, nargs="+", default=[50, 101], choices=sorted(DEPTHS))
    parser.add_argument("--noise", type=float, default=0.1, help="noise std relative to each tensor's std")
    parser.add_argument("--bare", action="store_true", help="no decode head: stage streams are permuted too")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| model | params | perms | units | time permuted B (s) | rounds | recovered | "
          "time B = A + noise (s) | identity |")
    print("|---|---|---|---|---|---|---|---|---|")
    for depth in args.depth:
        a = resnetv1c_state_dict(depth, head=not args.bare)
        spec = spec_from_state_dict(a)
        gen = torch.Generator().manual_seed(1)
        pi = {p: torch.randperm(n, generator=gen) for p, n in spec.sizes.items()}

        b = noisy(apply_permutation(a, spec, pi), args.noise, gen)
        start = time.perf_counter()
        found, rounds = weight_matching(a, b, spec, seed=0)
        t_perm = time.perf_counter() - start
        inverse = {p: torch.argsort(v) for p, v in pi.items()}
        units = sum(spec.sizes.values())
        recovered = sum(int((found[p] == inverse[p]).sum()) for p in spec.sizes) / units
        start = time.perf_counter()
        _, report = align_state_dicts(a, noisy(a, args.noise, gen), seed=0)
        t_same = time.perf_counter() - start
        params = sum(v.numel() for k, v in a.items() if k.startswith("backbone.")) / 1e6
        print(f"| ResNetV1c-{depth}{' bare' if args.bare else ' + head'} | {params:.1f} M | {len(spec.sizes)} | "
              f"{units} | {t_perm:.2f} | {rounds} | {recovered:.4f} | {t_same:.2f} | {report.overall:.4f} |")


if __name__ == "__main__":
    main()
