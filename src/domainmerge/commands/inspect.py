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
    from domainmerge.merging.engine import nonfinite_message

    bad = summary["nonfinite"]
    return f"warning: {nonfinite_message(summary['file'], bad)}" if bad else None


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(summaries: list[dict[str, Any]], comparison: dict[str, Any] | None,
           diagnostics: str | None) -> str:
    """Human-readable report (Markdown tables)."""
    lines: list[str] = []
    for s in summaries:
        lines.append(f"## {s['file']}")
        lines.append(f"format: {s['format']}" + (f"; other entries: {', '.join(s['extras'])}" if s["extras"] else ""))
        lines.append(f"prefixes: {', '.join(s['prefixes']) or 'none'}")
        lines.append(f"tensors: {s['tensors']}; parameters: {s['parameters']:,}; dtypes: "
                     + ", ".join(f"{d} x{n}" for d, n in s["dtypes"].items()))
        bn = f"BatchNorm layers: {s['bn_layers']}"
        if s["bn_layers"]:
            bn += f"; num_batches_tracked: {', '.join(map(str, s['bn_counts'])) or 'none'}"
            if s["bn_layers_without_count"]:
                bn += f" ({s['bn_layers_without_count']} layers without a count)"
        lines.append(bn)
        warning = nonfinite_warning(s)
        if warning:
            lines.append(f"**{warning}**")
        lines.append("")
        lines.append("| module | tensors | parameters |")
        lines.append("|---|---:|---:|")
        for name, m in s["modules"].items():
            lines.append(f"| {name} | {m['tensors']} | {m['parameters']:,} |")
        lines.append("")
    if comparison is not None:
        lines.append("## can they be merged?")
        lines.append(("yes: " if comparison["mergeable"] else "no: ") + comparison["reason"])
        for other, groups in comparison["distances"].items():
            lines.append("")
            lines.append(f"distance of {other} from {summaries[0]['file']}:")
            lines.append("")
            lines.append("| module | relative L2 of parameters | mean abs diff of BN means |")
            lines.append("|---|---:|---:|")
            for g, d in groups.items():
                lines.append(f"| {g} | {_fmt(d['rel_l2'], '.4f')} | {_fmt(d['bn_mean_abs_diff'], '.4g')} |")
        lines.append("")
    if diagnostics:
        lines.append(diagnostics)
    return "\n".join(lines).rstrip() + "\n"


def run(args: argparse.Namespace) -> int:
    """Parse, inspect with :func:`domainmerge.merging.inspection.inspect_files`, print."""
    import sys

    from domainmerge.merging.inspection import inspect_files

    found = inspect_files(args.inputs, base=args.base, trust_pickle=args.trust_pickle)
    comparison = found.comparison
    if comparison is not None and found.merge_error is not None:  # the reason with the flags to use
        comparison = {k: v for k, v in comparison.items() if k != "error"}
        comparison["reason"] = found.merge_error.for_command()
    diagnostics_text = None
    if found.diagnostics is not None:
        from domainmerge.alignment.diagnostics import render_report

        diagnostics_text = render_report(found.diagnostics)
    for summary in found.summaries:
        warning = nonfinite_warning(summary)
        if warning:
            print(f"domainmerge inspect: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps({"checkpoints": found.summaries, "comparison": comparison,
                          "diagnostics": found.diagnostics}, indent=2, default=str))
    else:
        print(render(found.summaries, comparison, diagnostics_text), end="")
    return 0
