"""`domainmerge demo`: the paper end to end in the built-in synthetic driving world, on a CPU."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    """Register `domainmerge demo`."""
    p = subparsers.add_parser(
        "demo", help="pretrain, adapt to each target, merge and evaluate in a synthetic world (CPU, minutes)",
        description="Runs the paper end to end in a built-in synthetic multi-domain driving world: "
                    "pretraining, source-only training, one self-training (STDA) run per target from the "
                    "same weights, a data-combination run, merges (buffer rules, backbone-only, all "
                    "subsets), evaluation on every target, interpolation curves; checks the paper's "
                    "claims (each judged from a bootstrap interval over val images: PASS, FAIL or TIE) and writes "
                    "results.json, results.md and plots.")
    p.add_argument("--preset", default="quick", choices=["quick", "full", "tiny"],
                   help="quick (2 min on 2 cores), full (8.5 min) or tiny (seconds, for tests)")
    p.add_argument("--targets", default=None,
                   help="comma-separated targets from city,idd,fog,night (the first two form the "
                        "two-target table; default: all four)")
    p.add_argument("--arch", default=None, choices=["tiny_daformer_r", "tiny_daformer_mit"],
                   help="network: ResNetV1c backbone + DAFormer head, BatchNorm throughout (default), or the "
                        "MiT (LayerNorm) backbone + DAFormer head, where only the head's BN statistics are merged")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0, help="seed of the world, the initialisation and sampling")
    seeds.add_argument("--seeds", default=None,
                       help="comma-separated seeds, e.g. 0,1,2: one full run per seed in OUT/seedS/, then the mean "
                            "and std of every number and each check's verdict per seed in OUT/results.json/.md")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the tiny networks gain little from more, and the "
                        "numbers then do not depend on the machine's core count, since the order of "
                        "parallel sums changes training; every figure in the README was measured so)")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes for the independent training runs and the methods table "
                        "(default: the usable cores, at most 4); the numbers are the same for any value")
    p.add_argument("--force", action="store_true", help="overwrite an existing results.json in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo; exit status 0 when it completes (FAIL lines are results, not errors)."""
    import torch

    from domainmerge.demo import preset_with, run_demo
    from domainmerge.demo.jobs import default_jobs
    from domainmerge.demo.seeds import parse_seeds, run_seeds
    from domainmerge.errors import UserError
    from domainmerge.fsutil import check_output_dir

    if args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be at least 1")
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: must be at least 1")
    jobs = default_jobs() if args.jobs is None else args.jobs
    check_output_dir(args.out, option="--out")
    preset = preset_with(args.preset, args.targets, args.arch)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    torch.set_num_threads(args.threads)
    if seeds is None:
        run_demo(preset, args.out, seed=args.seed, force=args.force, jobs=jobs)
    else:
        run_seeds(preset, args.out, seeds, force=args.force, jobs=jobs)
    return 0
