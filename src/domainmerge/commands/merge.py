"""`domainmerge merge`: merge N checkpoints into one (or one per input with --keep-heads)."""

from __future__ import annotations

import argparse
from typing import Any

from domainmerge.commands._common import add_domain_argument, parse_domains
from domainmerge.errors import Option, UserError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "merge", help="merge N checkpoints (parameters averaged, BN statistics pooled)",
        description="Merge checkpoints adapted from the same pretrained weights: parameters are averaged, "
                    "BatchNorm statistics merged as pooled Gaussians weighted by num_batches_tracked.")
    p.add_argument("inputs", nargs="*", metavar="CKPT", help="checkpoints (.pth/.pt/.bin/.safetensors), 2 or more")
    p.add_argument("--config", metavar="RECIPE",
                   help="a YAML recipe: models, weights, base, method and knobs, buffers, per-module rules "
                        "(see domainmerge.merging.recipe); replaces the inputs and the merge options")
    p.add_argument("-o", "--output", required=True, help="output file; its suffix picks the format")
    p.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="one weight per input (non-negative, normalised to sum 1; default uniform)")
    p.add_argument("--buffers", choices=["gaussian", "mean", "first"], default="gaussian",
                   help="BN statistics: pooled Gaussians (default, the paper), plain mean, or first model's")
    p.add_argument("--counts", nargs="+", type=float, metavar="N",
                   help="samples behind each input's BN statistics (default: each layer's num_batches_tracked)")
    p.add_argument("--method", default="linear",
                   choices=["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "fisher", "adamerging"],
                   help="parameter rule: weighted average (default, the paper's); a task-vector method "
                        "(needs --base): task arithmetic, TIES, DARE + linear / + TIES; or one that READS "
                        "UNLABELED TARGET IMAGES (--domain, --images): fisher (one domain per model, in order), "
                        "adamerging (needs --base)")
    p.add_argument("--base", metavar="CKPT",
                   help="the weights the models were adapted from (e.g. source-only or ImageNet); task "
                        "vectors are taken against it; parameters it lacks are averaged")
    p.add_argument("--lambda", dest="lam", type=float, metavar="L",
                   help="task-vector scaling (default 1: the weighted average of the models)")
    p.add_argument("--density", type=float, metavar="D",
                   help="TIES / dare_ties: share of each task vector kept by magnitude (default 0.2)")
    p.add_argument("--drop", type=float, metavar="P",
                   help="DARE: probability of dropping a task-vector entry (default 0.9)")
    p.add_argument("--seed", type=int, help="DARE: seed of the drop masks (default 0)")
    add_domain_argument(p, "fisher/adamerging: unlabeled images of a target", default_split="train")
    p.add_argument("--images", type=int, metavar="N",
                   help="fisher/adamerging: images over all domains (default 64)")
    p.add_argument("--steps", type=int, help="adamerging: optimisation steps (default 100)")
    p.add_argument("--lr", type=float, help="adamerging: Adam learning rate (default 1e-3)")
    p.add_argument("--granularity", choices=["layer", "model"],
                   help="adamerging: a coefficient per model and parameter tensor (default) or per model")
    p.add_argument("--batch-size", type=int, help="fisher/adamerging: images per batch (default 4)")
    p.add_argument("--device", default=None, help="fisher/adamerging: cpu or cuda (default: cuda when available)")
    p.add_argument("--keep-heads", metavar="PREFIX",
                   help="merge everything outside PREFIX (e.g. decode_head.), write one checkpoint per input "
                        "with its own head")
    p.add_argument("--names", nargs="+", metavar="NAME",
                   help="with --keep-heads: output names, merged.NAME.pth (default: 1, 2, ...)")
    p.add_argument("--only", metavar="PREFIX", help="merge only keys under PREFIX (e.g. model.); copy the rest "
                                                    "from the first input")
    p.add_argument("--prefix", metavar="PREFIX",
                   help="merge only the network under PREFIX in every input, written without it (auto: model. "
                        "when present, else module., else none); for inputs whose keys carry different prefixes")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32", "float64"],
                   help="dtype of the output's floating tensors (default: the widest dtype of the inputs; "
                        "merging always accumulates in float32 or wider)")
    p.add_argument("--allow-missing", action="store_true",
                   help="merge the keys all inputs share; copy the others from the first input that has them")
    p.add_argument("--align", action="store_true",
                   help="align every model to the first with Git Re-Basin weight matching before averaging")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow full unpickling of .pth files (only for files you trust)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=run, recipe_defaults={dest: p.get_default(dest) for dest in RECIPE_OPTIONS})


# Library options whose flag is not --name-with-dashes (errors name options; the CLI names flags).
FLAGS = {"lam": "--lambda"}
# Options a recipe sets; giving one beside --config is refused rather than silently overridden.
RECIPE_OPTIONS = ("weights", "buffers", "counts", "keep_heads", "names", "only", "allow_missing", "align", "method",
                  "base", "lam", "density", "drop", "seed", "images", "batch_size", "steps", "lr", "granularity",
                  "device")


def _check_config(args: argparse.Namespace) -> None:
    """--config replaces the inputs and the merge options: refuse them beside it."""
    if args.inputs:
        raise UserError(f"--config {args.config}: the recipe lists the models; give no checkpoints beside it")
    defaults = getattr(args, "recipe_defaults", {})
    for dest in RECIPE_OPTIONS:
        if dest in defaults and getattr(args, dest) != defaults[dest]:
            raise UserError(Option(dest), f" is given beside --config {args.config}; set it in the recipe instead")
    if args.domain:  # a recipe's methods read no images
        raise UserError("--domain is only read by the methods that use data (fisher, adamerging)")


def spec_of(args: argparse.Namespace) -> Any:
    """The :class:`~domainmerge.merging.spec.MergeSpec` of the command line (a knob the method
    does not read is refused)."""
    from domainmerge.merging.spec import KNOBS, MergeSpec

    return MergeSpec.build(args.method, weights=args.weights, buffers=args.buffers, counts=args.counts,
                           keep_heads=args.keep_heads, names=args.names, only=args.only,
                           allow_missing=args.allow_missing, align=args.align,
                           **{k: getattr(args, k) for k in KNOBS})


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} GB"


def summary(report: Any) -> str:
    """The lines `merge` prints about a :class:`~domainmerge.merging.files.MergeReport`."""
    n = len(report.inputs)
    if report.uses_target_data:
        coef = f" and {report.coefficients}" if report.coefficients is not None else ""
        return (f"merged {n} models with {report.method} (uses target data); buffers: {report.buffers}\n"
                f"wrote {report.outputs[0]}{coef}; time: {report.seconds:.2f} s")
    method = "" if report.method == "linear" else \
        f"; method: {report.method} from {report.base.name if report.base else None} (lambda {report.lam:g})"
    why = ("as --dtype asks" if report.dtype_given
           else "the widest of the inputs" if len(report.input_dtypes) > 1 else "as the inputs")
    lines = [f"merged {n} models with weights {', '.join(f'{w:.3g}' for w in report.weights)}; "
             f"buffers: {report.buffers}{method}",
             "tensors: " + ", ".join(f"{count} {role}" for role, count in report.tensors.items()),
             f"dtype: {', '.join(report.dtypes)} ({why}; inputs: {', '.join(report.input_dtypes)}; "
             "accumulated in float32 or wider)",
             f"BatchNorm layers merged: {report.bn_layers}"]
    for rule in report.record.get("recipe", {}).get("rules", []):
        what = "kept per model" if rule.get("keep_own") else rule["method"]
        knobs = "".join(f", {k} {rule[k]:g}" for k in ("lam", "density", "drop", "seed") if k in rule)
        n = report.rules.get(rule["pattern"], 0)
        lines.append(f"rule {rule['pattern']!r} ({what}{knobs}): {n} key{'' if n == 1 else 's'}")
    for name, aligned in report.alignment.items():
        lines.append(f"aligned {name} to {report.inputs[0].name}: {aligned.overall:.1%} of units kept "
                     f"in place over {len(aligned.sizes)} permutations ({aligned.seconds:.1f} s)")
    lines += [f"wrote {out} ({_human(out.stat().st_size)})" for out in report.outputs]
    lines.append(f"time: {report.seconds:.2f} s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Parse, merge with :func:`domainmerge.merging.files.merge_files`, print the summary."""
    from domainmerge.merging.files import DATA_METHODS, merge_files, merge_recipe_files
    from domainmerge.runtime.device import resolve_device

    if args.config is not None:
        _check_config(args)
        report = merge_recipe_files(args.config, args.output, prefix=args.prefix, dtype=args.dtype,
                                    trust_pickle=args.trust_pickle, force=args.force, progress=not args.quiet)
    else:
        data = args.method in DATA_METHODS
        report = merge_files(
            args.inputs, args.output, spec_of(args), base=args.base,
            domains=parse_domains(args.domain, "train") if args.domain else None, prefix=args.prefix,
            dtype=args.dtype, device=resolve_device(args.device) if data else args.device,
            trust_pickle=args.trust_pickle, force=args.force, progress=not args.quiet,
            log=lambda line: print(line, flush=True))
    if not args.quiet:
        print(summary(report))
    return 0
