"""`domainmerge align`: permute B's backbone units onto A's (Git Re-Basin weight matching)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "align", help="permute B's hidden units to match A (Git Re-Basin weight matching)",
        description="Find the permutation of B's backbone units that best matches A (weight matching), write "
                    "B permuted (it computes the same function) and report, per permutation, the fraction "
                    "of units mapped to themselves: near 100% for models adapted from shared weights. Units "
                    "feeding the decode head stay in place (the head is not permuted), so for models from "
                    "different initialisations alignment lowers but need not remove the interpolation barrier.")
    p.add_argument("reference", metavar="A", help="reference checkpoint (kept as is)")
    p.add_argument("other", metavar="B", help="checkpoint to permute")
    p.add_argument("-o", "--output", required=True, help="aligned B; its suffix picks the format")
    p.add_argument("--prefix", help="backbone key prefix, e.g. model.backbone. (default: detected)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random visiting order (default 0)")
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow full unpickling of .pth files (only for files you trust)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Parse, align with :func:`domainmerge.alignment.matching.align_files`, print the report."""
    from domainmerge.alignment.matching import align_files
    from domainmerge.fsutil import check_output_path
    from domainmerge.reporting import alignment_markdown, write_json

    if args.json:
        check_output_path(args.json, force=args.force, inputs=(args.reference, args.other))
    print(f"matching {Path(args.other).name} to {Path(args.reference).name} ...", flush=True)
    result = align_files(args.reference, args.other, args.output, prefix=args.prefix, seed=args.seed,
                         trust_pickle=args.trust_pickle, force=args.force)
    print(alignment_markdown(result.report), end="")
    if result.unpermuted:
        print(f"note: only {result.report.prefix} was permuted; the {', '.join(result.unpermuted)} copies are left "
              "as they are")
    print(f"wrote {args.output}")
    if args.json:
        write_json(args.json, result.report.to_dict(), replace=args.force)
    return 0
