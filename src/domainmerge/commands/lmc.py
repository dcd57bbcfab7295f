"""`domainmerge lmc`: linear mode connectivity curves (or simplex grids) and barriers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Evaluate models on the straight line between two checkpoints, (1 - lambda) A + lambda B, over
--steps lambdas (or, for 3+ checkpoints, on a grid over their simplex with --grid points per
edge) on every --domain: mIoU per domain and H at each point, and the barrier per domain and
for H (Git Re-Basin's form: mean of the end points minus the curve's minimum; 0 means no dip).
Interpolation uses the merge rules (parameters averaged, BN statistics per --buffers), so the
mid-point is the model `domainmerge merge` writes. Writes lmc.json, lmc.md and a plot (lmc.png;
for 3 models a ternary heat map) under --out. Data-parallel under torchrun; rank 0 writes.
"""


def add_parser(sub: Any) -> None:
    from domainmerge.commands._common import add_domain_argument, add_inference_options, add_network_options

    p = sub.add_parser("lmc", help="interpolation curves between checkpoints and their barriers",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="+", metavar="CKPT", help="2 checkpoints (a curve) or more (a simplex grid)")
    add_domain_argument(p)
    p.add_argument("--steps", type=int, help="lambdas from 0 to 1 for 2 models (default 11)")
    p.add_argument("--grid", type=int, help="points per simplex edge for 3+ models (default 5)")
    p.add_argument("--buffers", choices=["gaussian", "mean", "first"], default="gaussian",
                   help="BN statistics rule along the path (default gaussian, the paper's)")
    p.add_argument("--align", action="store_true",
                   help="first permute every model onto the first (Git Re-Basin weight matching)")
    p.add_argument("--out", metavar="DIR", help="write lmc.json, lmc.md and the plot here")
    add_network_options(p)
    add_inference_options(p)
    p.add_argument("--force", action="store_true", help="overwrite existing files under --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Scan with :func:`domainmerge.analysis.interpolation.interpolate_checkpoints`, print the
    table on rank 0, write the files under --out."""
    from domainmerge import reporting
    from domainmerge.analysis import lmc
    from domainmerge.analysis.interpolation import interpolate_checkpoints
    from domainmerge.commands._common import parse_domains, protocol_settings
    from domainmerge.errors import UserError
    from domainmerge.fsutil import check_output_dir, check_output_path
    from domainmerge.runtime import distributed
    from domainmerge.runtime.device import resolve_device

    domains = parse_domains(args.domain, "val")
    k = len(args.ckpts)
    if k == 2 and args.grid is not None:   # two models make a curve (--steps), not a simplex grid
        raise UserError("--grid sets the simplex grid of 3 or more checkpoints; for two, set the curve's --steps")
    if k > 2 and args.steps is not None:
        raise UserError(f"--steps sets the curve between 2 checkpoints; for {k}, set the simplex's --grid")
    outputs: dict[str, Path] = {}
    if args.out:
        out_dir = check_output_dir(args.out, option="--out")
        plot = "lmc.png" if k == 2 else ("lmc_ternary.png" if k == 3 else None)
        outputs = {n: out_dir / n for n in ("lmc.json", "lmc.md", plot) if n}
        for path in outputs.values():
            if out_dir.is_dir():
                check_output_path(path, force=args.force, inputs=tuple(args.ckpts))

    with distributed.process_group_from_env():
        main = distributed.is_main_process()
        found = interpolate_checkpoints(
            args.ckpts, domains, steps=11 if args.steps is None else args.steps,
            grid=5 if args.grid is None else args.grid, buffers=args.buffers,
            align=args.align,
            arch=args.arch, prefix=args.prefix, trust_pickle=args.trust_pickle, **protocol_settings(args),
            device=resolve_device(args.device), batch_size=args.batch_size,
            num_classes=args.num_classes, amp=args.amp, workers=args.workers, strict=not args.no_strict,
            progress=not args.quiet, log=(lambda line: print(line, file=sys.stderr)) if main else None)
    if not main:
        return 0
    text = lmc.render(found.rows, found.barriers, found.names)
    print(text, end="")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        reporting.write_json(outputs["lmc.json"], found.to_dict(), replace=args.force)
        reporting.write_markdown(outputs["lmc.md"], text, replace=args.force)
        if k == 2:
            lmc.plot_curve(found.rows, found.names, outputs["lmc.png"])
        elif k == 3:
            lmc.plot_ternary(found.rows, found.names, outputs["lmc_ternary.png"])
        print(f"wrote {', '.join(str(p) for p in outputs.values())}")
    return 0
