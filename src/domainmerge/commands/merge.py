"""`domainmerge merge`: merge N checkpoints into one (or one per input with --keep-heads)."""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any

from domainmerge.errors import UserError

DTYPES = ("float16", "bfloat16", "float32", "float64")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "merge", help="merge N checkpoints (parameters averaged, BN statistics pooled)",
        description="Merge checkpoints adapted from the same pretrained weights: parameters are averaged, "
                    "BatchNorm statistics merged as pooled Gaussians weighted by num_batches_tracked.")
    p.add_argument("inputs", nargs="+", metavar="CKPT", help="checkpoints (.pth/.pt/.bin/.safetensors), 2 or more")
    p.add_argument("-o", "--output", required=True, help="output file; its suffix picks the format")
    p.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="one weight per input (non-negative, normalised to sum 1; default uniform)")
    p.add_argument("--buffers", choices=["gaussian", "mean", "first"], default="gaussian",
                   help="BN statistics: pooled Gaussians (default, the paper), plain mean, or first model's")
    p.add_argument("--counts", nargs="+", type=float, metavar="N",
                   help="samples behind each input's BN statistics (default: each layer's num_batches_tracked)")
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
    p.add_argument("--dtype", choices=sorted(DTYPES),
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
    p.set_defaults(func=run)


def head_output_paths(output: Path, n: int, names: list[str] | None) -> list[Path]:
    """merged.pth + names [cs, idd] -> merged.cs.pth, merged.idd.pth (1-based indices without names)."""
    if names is not None and len(names) != n:
        raise UserError(f"--names: got {len(names)} names for {n} inputs; give one name per input")
    labels = names or [str(i + 1) for i in range(n)]
    if len(set(labels)) != len(labels):
        raise UserError(f"--names: names must differ, got {labels}")
    return [output.with_name(f"{output.stem}.{label}{output.suffix}") for label in labels]


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} GB"


def _dtype_summary(plan: Any, checkpoints: list[Any]) -> str:
    """Which dtype the floating tensors were written in, and why."""
    out = sorted({str(d).replace("torch.", "") for d in plan.dtypes.values() if d.is_floating_point})
    given = sorted({str(i.dtype).replace("torch.", "") for ck in checkpoints for i in ck.infos.values()
                    if i.dtype.is_floating_point})
    why = ("as --dtype asks" if plan.options.dtype is not None
           else "the widest of the inputs" if len(given) > 1 else "as the inputs")
    return f"dtype: {', '.join(out)} ({why}; inputs: {', '.join(given)}; accumulated in float32 or wider)"


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from domainmerge import __version__
    from domainmerge.checkpoint import (
        Checkpoint,
        SafetensorsWriter,
        TensorInfo,
        build_container,
        open_checkpoint,
        output_format,
        write_pickle,
    )
    from domainmerge.fsutil import atomic_path, check_output_path
    from domainmerge.merging import DictSource, MergeOptions, StrippedSource, iter_merged, plan_merge
    from domainmerge.merging.engine import check_options

    start = time.perf_counter()
    if len(args.inputs) < 2:
        raise UserError("give at least two checkpoints to merge")
    if len(set(Path(p).resolve() for p in args.inputs)) != len(args.inputs):
        raise UserError("the same checkpoint is given twice; use --weights to weigh a model more")
    if args.names and not args.keep_heads:
        raise UserError("--names only applies with --keep-heads")
    import torch

    options = MergeOptions(weights=args.weights, buffers=args.buffers, counts=args.counts,
                           keep_heads=args.keep_heads, only=args.only, allow_missing=args.allow_missing,
                           dtype=getattr(torch, args.dtype) if args.dtype else None)
    check_options(options, len(args.inputs))
    output = Path(args.output)
    outputs = head_output_paths(output, len(args.inputs), args.names) if args.keep_heads else [output]
    for out in outputs:
        output_format(out)
        check_output_path(out, force=args.force, inputs=tuple(args.inputs))
    fmt = output_format(outputs[0])

    checkpoints: list[Checkpoint] = []
    with contextlib.ExitStack() as stack:
        for path in args.inputs:
            checkpoints.append(stack.enter_context(open_checkpoint(path, trust_pickle=args.trust_pickle)))
        sources: list[Any] = list(checkpoints)
        if args.prefix is not None:
            sources = [StrippedSource(ck, args.prefix) for ck in checkpoints]
        align_report: dict[str, Any] = {}
        if args.align:
            from domainmerge.alignment.matching import align_state_dicts

            ref = {k: sources[0].get(k) for k in sources[0].keys()}
            aligned_sources: list[Any] = [DictSource(ref, str(checkpoints[0].path))]
            for ck, src in zip(checkpoints[1:], sources[1:]):
                aligned, report = align_state_dicts(ref, {k: src.get(k) for k in src.keys()})
                aligned_sources.append(DictSource(aligned, str(ck.path)))
                align_report[ck.path.name] = report
            sources = aligned_sources
        plan = plan_merge(sources, options)
        record = {
            "tool": f"domainmerge {__version__}",
            "inputs": [Path(p).name for p in args.inputs],
            "weights": plan.weights,
            "buffers": args.buffers,
            "counts": list(args.counts) if args.counts else "num_batches_tracked",
            "keep_heads": args.keep_heads,
            "only": args.only,
            "prefix": args.prefix,
            "dtype": args.dtype or "widest input",
            "aligned": bool(args.align),
        }
        infos = {k: TensorInfo(plan.shapes[k], plan.dtypes[k]) for k in plan.keys}
        bar = tqdm(plan.keys, desc="merging", unit="tensor", disable=True if args.quiet else None)
        with contextlib.ExitStack() as outs:
            tmps = [outs.enter_context(atomic_path(out, replace=args.force)) for out in outputs]
            if fmt == "safetensors":
                metadata = dict(checkpoints[0].metadata)
                metadata.setdefault("format", "pt")
                metadata["domainmerge"] = __import__("json").dumps(record)
                handles = [outs.enter_context(open(tmp, "wb")) for tmp in tmps]
                writers = [SafetensorsWriter(fh, infos, metadata) for fh in handles]
                for key, tensors in iter_merged(sources, plan):
                    for w, t in zip(writers, tensors):
                        w.write(key, t)
                    bar.update()
                for w in writers:
                    w.finish()
                for fh in handles:
                    fh.close()
            else:
                results: list[dict[str, Any]] = [{} for _ in outputs]
                for key, tensors in iter_merged(sources, plan):
                    for res, t in zip(results, tensors):
                        res[key] = t
                    bar.update()
                for tmp, res in zip(tmps, results):
                    write_pickle(build_container(res, template=checkpoints[0], record=record), tmp)
                    res.clear()
        bar.close()
        dtype_line = _dtype_summary(plan, checkpoints)

    if not args.quiet:
        elapsed = time.perf_counter() - start
        roles = ", ".join(f"{n} {role}" for role, n in plan.stats.items() if role != "bn_layers")
        print(f"merged {len(args.inputs)} models with weights "
              f"{', '.join(f'{w:.3g}' for w in plan.weights)}; buffers: {args.buffers}")
        print(f"tensors: {roles}")
        print(dtype_line)
        print(f"BatchNorm layers merged: {plan.stats.get('bn_layers', 0)}")
        if align_report:
            for name, report in align_report.items():
                print(f"aligned {name} to {Path(args.inputs[0]).name}: {report.overall:.1%} of units kept "
                      f"in place over {len(report.sizes)} permutations ({report.seconds:.1f} s)")
        for out in outputs:
            print(f"wrote {out} ({_human(out.stat().st_size)})")
        print(f"time: {elapsed:.2f} s")
    return 0
