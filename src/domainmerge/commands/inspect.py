"""`domainmerge inspect`: what a checkpoint holds, and whether several can be merged."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("inspect", help="show what checkpoints hold and whether they can be merged",
                       description="Format, prefixes, tensors and parameters per top-level module, dtypes and "
                                   "BatchNorm layers; for several inputs, whether they can be merged and how "
                                   "far apart they are per module.")
    p.add_argument("inputs", nargs="+", metavar="CKPT")
    p.add_argument("--base", metavar="PRETRAINED",
                   help="the shared pretrained checkpoint: adds task-vector diagnostics and a verdict")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--trust-pickle", action="store_true", help="allow full unpickling of .pth files")
    p.set_defaults(func=run)


def nonfinite_warning(summary: dict[str, Any]) -> str | None:
    """The warning line for a checkpoint with NaN/inf tensors, or None."""
    from domainmerge.tensors import nonfinite_message

    bad = summary["nonfinite"]
    return f"warning: {nonfinite_message(summary['file'], bad)}" if bad else None


def run(args: argparse.Namespace) -> int:
    """Parse, inspect with :func:`domainmerge.merging.inspection.inspect_files`, print."""
    import sys

    from domainmerge.merging.inspection import inspect_files

    found = inspect_files(args.inputs, base=args.base, trust_pickle=args.trust_pickle)
    result = found.to_dict()   # rendered under the command line: the reason names the flags
    diagnostics_text = None
    if found.diagnostics is not None:
        from domainmerge.alignment.diagnostics import render_report

        diagnostics_text = render_report(found.diagnostics)
    for summary in found.summaries:
        warning = nonfinite_warning(summary)
        if warning:
            print(f"domainmerge inspect: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        from domainmerge.reporting import inspect_markdown

        warnings = [nonfinite_warning(summary) for summary in found.summaries]
        print(inspect_markdown(found.summaries, result["comparison"], diagnostics_text, warnings), end="")
    return 0
