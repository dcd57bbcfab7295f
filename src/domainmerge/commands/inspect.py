"""`domainmerge inspect`: what a checkpoint holds, and whether several can be merged."""

from __future__ import annotations

import argparse
import json
from typing import Any

from domainmerge.errors import UserError


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


def module_group(key: str, wrappers: list[str]) -> str:
    """Top-level module of a key: 'model.backbone.x.y' -> 'model.backbone', 'backbone.x' -> 'backbone'."""
    for w in wrappers:
        if key.startswith(w):
            rest = key[len(w):]
            return w + rest.split(".", 1)[0] if "." in rest else w.rstrip(".")
    return key.split(".", 1)[0] if "." in key else "(top level)"


def summarize(ck: Any) -> dict[str, Any]:
    """Facts about one opened checkpoint; parameter data is read only to find NaN/inf values."""
    from collections import Counter

    from domainmerge.checkpoint import detect_prefixes
    from domainmerge.merging import Role, all_finite, assign_roles

    keys = ck.keys()
    prefixes = detect_prefixes(keys)
    roles = assign_roles({k: ck.infos[k].dtype for k in keys})
    modules: dict[str, dict[str, int]] = {}
    for k in keys:
        group = modules.setdefault(module_group(k, prefixes), {"tensors": 0, "parameters": 0})
        group["tensors"] += 1
        if roles[k] == Role.PARAM:
            group["parameters"] += ck.infos[k].numel
    bn = {}
    for k in keys:
        if roles[k] == Role.BN_MEAN:
            layer = k.rpartition(".")[0]
            count_key = f"{layer}.num_batches_tracked"
            bn[layer] = int(ck.get(count_key).item()) if count_key in ck else None
    counts = sorted({c for c in bn.values() if c is not None})
    nonfinite = []
    for k in keys:
        if ck.infos[k].dtype.is_floating_point and not all_finite(ck.get(k)):
            nonfinite.append(k)
        ck.release(k)
    return {
        "file": str(ck.path),
        "format": ck.format if ck.container_key is None else f"{ck.format} container '{ck.container_key}'",
        "extras": sorted(str(k) for k in ck.extras),
        "prefixes": prefixes,
        "tensors": len(keys),
        "parameters": sum(m["parameters"] for m in modules.values()),
        "dtypes": dict(Counter(str(ck.infos[k].dtype).replace("torch.", "") for k in keys)),
        "modules": modules,
        "bn_layers": len(bn),
        "bn_counts": counts if len(counts) <= 6 else [counts[0], "...", counts[-1]],
        "bn_layers_without_count": sum(c is None for c in bn.values()),
        "nonfinite": nonfinite,
    }


def nonfinite_warning(summary: dict[str, Any]) -> str | None:
    """The warning line for a checkpoint with NaN/inf tensors, or None."""
    bad = summary["nonfinite"]
    if not bad:
        return None
    return (f"warning: {summary['file']}: {len(bad)} tensors hold NaN or infinite values (e.g. {bad[0]!r}); "
            "the checkpoint is damaged or diverged")


def compare(cks: list[Any]) -> dict[str, Any]:
    """Whether the checkpoints can be merged, and per module how far apart they are from the first."""
    from domainmerge.checkpoint import detect_prefixes
    from domainmerge.merging import MergeOptions, Role, assign_roles, plan_merge

    try:
        plan_merge(cks, MergeOptions())
        verdict: dict[str, Any] = {"mergeable": True, "reason": "same keys and shapes"}
    except UserError as exc:
        return {"mergeable": False, "reason": str(exc), "distances": {}}
    ref = cks[0]
    keys = ref.keys()
    prefixes = detect_prefixes(keys)
    roles = assign_roles({k: ref.infos[k].dtype for k in keys})
    distances: dict[str, dict[str, Any]] = {}
    for other in cks[1:]:
        acc: dict[str, list[float]] = {}
        for k in keys:
            group = acc.setdefault(module_group(k, prefixes), [0.0, 0.0, 0.0, 0.0])
            if roles[k] == Role.PARAM:
                a, b = ref.get(k).double(), other.get(k).double()
                group[0] += float(((a - b) ** 2).sum())
                group[1] += float((a ** 2).sum())
            elif roles[k] == Role.BN_MEAN:
                a, b = ref.get(k).double(), other.get(k).double()
                group[2] += float((a - b).abs().sum())
                group[3] += a.numel()
        distances[str(other.path)] = {
            g: {"rel_l2": (v[0] ** 0.5) / (v[1] ** 0.5) if v[1] > 0 else None,
                "bn_mean_abs_diff": v[2] / v[3] if v[3] else None}
            for g, v in acc.items()}
    verdict["distances"] = distances
    return verdict


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
    import contextlib

    from domainmerge.checkpoint import open_checkpoint

    with contextlib.ExitStack() as stack:
        cks = [stack.enter_context(open_checkpoint(p, trust_pickle=args.trust_pickle)) for p in args.inputs]
        summaries = [summarize(ck) for ck in cks]
        comparison = compare(cks) if len(cks) > 1 else None
        diagnostics_text, diagnostics = None, None
        if args.base:
            from domainmerge.alignment.diagnostics import render_report, task_vector_report

            with open_checkpoint(args.base, trust_pickle=args.trust_pickle) as base:
                diagnostics = task_vector_report(base.state_dict(),
                                                 {str(ck.path): ck.state_dict() for ck in cks})
            diagnostics_text = render_report(diagnostics)
    import sys

    for summary in summaries:
        warning = nonfinite_warning(summary)
        if warning:
            print(f"domainmerge inspect: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps({"checkpoints": summaries, "comparison": comparison, "diagnostics": diagnostics},
                         indent=2, default=str))
    else:
        print(render(summaries, comparison, diagnostics_text), end="")
    return 0
