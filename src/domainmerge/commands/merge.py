"""`domainmerge merge`: merge N checkpoints into one (or one per input with --keep-heads)."""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any

from domainmerge.commands._common import add_domain_argument, parse_domains, resolve_device
from domainmerge.errors import UserError

DATA_METHODS = ("fisher", "adamerging")
DTYPES = ("float16", "bfloat16", "float32", "float64")


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
    p.add_argument("--lambda", dest="lam", type=float, default=1.0, metavar="L",
                   help="task-vector scaling (default 1: the weighted average of the models)")
    p.add_argument("--density", type=float, default=0.2, metavar="D",
                   help="TIES / dare_ties: share of each task vector kept by magnitude (default 0.2)")
    p.add_argument("--drop", type=float, default=0.9, metavar="P",
                   help="DARE: probability of dropping a task-vector entry (default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="DARE: seed of the drop masks (default 0)")
    add_domain_argument(p, "fisher/adamerging: unlabeled images of a target", default_split="train")
    p.add_argument("--images", type=int, default=64, metavar="N",
                   help="fisher/adamerging: images over all domains (default 64)")
    p.add_argument("--steps", type=int, default=100, help="adamerging: optimisation steps (default 100)")
    p.add_argument("--lr", type=float, default=1e-3, help="adamerging: Adam learning rate (default 1e-3)")
    p.add_argument("--granularity", choices=["layer", "model"], default="layer",
                   help="adamerging: a coefficient per model and parameter tensor (default) or per model")
    p.add_argument("--batch-size", type=int, default=4, help="fisher/adamerging: images per batch (default 4)")
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
    p.set_defaults(func=run, recipe_defaults={dest: p.get_default(dest) for dest in RECIPE_FLAGS})


# Options a recipe sets; giving one beside --config is refused rather than silently overridden.
RECIPE_FLAGS = {"weights": "--weights", "buffers": "--buffers", "counts": "--counts", "keep_heads": "--keep-heads",
                "names": "--names", "only": "--only", "allow_missing": "--allow-missing", "align": "--align",
                "method": "--method", "base": "--base", "lam": "--lambda", "density": "--density",
                "drop": "--drop", "seed": "--seed"}


def _apply_recipe(args: argparse.Namespace) -> Any:
    """Fill ``args`` from ``--config`` (or build the recipe equal to the command line)."""
    from domainmerge.merging import MergeOptions
    from domainmerge.merging.recipe import load_recipe, recipe_from_options

    if args.config is None:
        options = MergeOptions(weights=args.weights, buffers=args.buffers, counts=args.counts,
                               keep_heads=args.keep_heads, only=args.only, allow_missing=args.allow_missing,
                               method=args.method, lam=args.lam, density=args.density, drop=args.drop,
                               seed=args.seed)
        return recipe_from_options(args.inputs, options, base=args.base, align=args.align, names=args.names)
    if args.inputs:
        raise UserError(f"--config {args.config}: the recipe lists the models; give no checkpoints beside it")
    defaults = getattr(args, "recipe_defaults", {})
    for dest, flag in RECIPE_FLAGS.items():
        if dest in defaults and getattr(args, dest) != defaults[dest]:
            raise UserError(f"{flag} is given beside --config {args.config}; set it in the recipe instead")
    recipe = load_recipe(args.config)
    args.inputs = recipe.models
    for dest in ("weights", "buffers", "counts", "keep_heads", "names", "only", "allow_missing", "align",
                 "method", "base", "lam", "density", "drop", "seed"):
        setattr(args, dest, getattr(recipe, dest))
    return recipe


def _network_prefix(state_dict: Any) -> str:
    """The student network's wrapper prefix: 'model.' (DA training), else 'module.' (DDP), else none."""
    from domainmerge.checkpoint import detect_prefixes

    found = detect_prefixes(state_dict)
    return "model." if "model." in found else ("module." if "module." in found else "")


def _merge_with_data(args: argparse.Namespace, output: Path, start: float) -> int:
    """fisher / adamerging: build the network, read unlabeled target images, merge, write."""
    import json

    from domainmerge.checkpoint import open_checkpoint, save_checkpoint
    from domainmerge.data import LAYOUTS, build_dataset
    from domainmerge.evaluation.recalibrate import image_batches, spread_indices
    from domainmerge.fsutil import check_output_path, write_text_atomic
    from domainmerge.merging.learned import adamerging, fisher_diagonal, fisher_merge
    from domainmerge.models import model_from_state_dict

    if args.keep_heads or args.align or args.only or args.config:
        raise UserError(f"--method {args.method} merges whole networks: it does not combine with --keep-heads, "
                        "--align, --only or --config")
    if args.method == "adamerging" and not args.base:
        raise UserError("--method adamerging learns coefficients of task vectors; give the weights the models "
                        "were adapted from with --base")
    if args.method == "fisher" and args.base:
        raise UserError("--method fisher needs no --base")
    domains = parse_domains(args.domain, "train")
    if args.method == "fisher" and len(domains) != len(args.inputs):
        raise UserError(f"--method fisher estimates each model's Fisher on its own target: give one --domain per "
                        f"model, in the order of the models ({len(args.inputs)}), got {len(domains)}")
    for name, value in (("--images", args.images), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{name} {value}: must be at least 1")
    if args.steps < 0 or not args.lr > 0:
        raise UserError(f"--steps must be >= 0 and --lr > 0, got {args.steps} and {args.lr}")
    coef_path = output.with_name(output.stem + ".coefficients.json")
    if args.method == "adamerging":
        check_output_path(coef_path, force=args.force, inputs=tuple(args.inputs))
    device = resolve_device(args.device)
    # Images only: the readers that can skip labels do, so unlabeled training splits work.
    datasets: dict[str, Any] = {
        name: build_dataset(kind, root, split, **({"labels": False} if kind in LAYOUTS or kind == "folder" else {}))
        for name, kind, root, split in domains}
    indices = spread_indices({n: len(ds) for n, ds in datasets.items()}, args.images)

    def batches(name: str) -> list[Any]:
        return list(image_batches(datasets, {name: indices[name]}, batch_size=args.batch_size))

    with contextlib.ExitStack() as stack:
        cks = [stack.enter_context(open_checkpoint(p, trust_pickle=args.trust_pickle)) for p in args.inputs]
        fulls = [ck.state_dict() for ck in cks]
        prefix = _network_prefix(fulls[0])
        nets = [{k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)} for sd in fulls]
        model = model_from_state_dict(nets[0])
        print(f"--method {args.method} READS TARGET IMAGES: "
              + ", ".join(f"{d} {len(v)}" for d, v in indices.items()), flush=True)
        extra: dict[str, Any] = {}
        if args.method == "fisher":
            fishers = [fisher_diagonal(model, sd, batches(name), device=device)
                       for sd, (name, *_rest) in zip(nets, domains)]
            merged = fisher_merge(nets, fishers, args.weights, buffers=args.buffers, counts=args.counts)
        else:
            base_full = stack.enter_context(open_checkpoint(args.base, trust_pickle=args.trust_pickle)).state_dict()
            bp = _network_prefix(base_full)
            base = {k[len(bp):]: v for k, v in base_full.items() if k.startswith(bp)}
            result = adamerging(model, nets, base, [batches(n) for n, *_ in domains], weights=args.weights,
                                granularity=args.granularity, steps=args.steps, lr=args.lr, buffers=args.buffers,
                                device=device, progress=not args.quiet)
            merged = result.state_dict
            extra = {"granularity": args.granularity, "steps": args.steps, "lr": args.lr,
                     "base": Path(args.base).name, "entropy": [result.entropy[0], result.entropy[-1]]
                     if result.entropy else []}
        out = dict(fulls[0])
        out.update({prefix + k: v for k, v in merged.items()})
        record = {"tool": "domainmerge", "inputs": [Path(p).name for p in args.inputs], "method": args.method,
                  "buffers": args.buffers, "uses_target_data": True,
                  "images": {d: len(v) for d, v in indices.items()}, **extra}
        if args.method == "adamerging":
            write_text_atomic(coef_path, json.dumps({"models": record["inputs"], "granularity": args.granularity,
                                                     "coefficients": result.coefficients,
                                                     "entropy": result.entropy}, indent=1))
        save_checkpoint(output, out, template=cks[0], record=record, force=args.force, inputs=tuple(args.inputs))
    if not args.quiet:
        print(f"merged {len(args.inputs)} models with {args.method} (uses target data); buffers: {args.buffers}")
        print(f"wrote {output}" + (f" and {coef_path}" if args.method == "adamerging" else "")
              + f"; time: {time.perf_counter() - start:.2f} s")
    return 0


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
    from domainmerge.merging import DictSource, StrippedSource, iter_merged, plan_merge
    from domainmerge.merging.engine import check_options
    from domainmerge.version import __version__

    start = time.perf_counter()
    recipe = _apply_recipe(args)
    if len(args.inputs) < 2:
        raise UserError("give at least two checkpoints to merge")
    if len(set(Path(p).resolve() for p in args.inputs)) != len(args.inputs):
        raise UserError("the same checkpoint is given twice; use --weights to weigh a model more")
    if args.names and not (args.keep_heads or any(r.keep_own for r in recipe.rules)):
        raise UserError("--names only applies with --keep-heads (or a recipe rule with keep: own)")
    import dataclasses

    import torch

    options = dataclasses.replace(recipe.options(), dtype=getattr(torch, args.dtype) if args.dtype else None)
    check_options(options, len(args.inputs))
    output = Path(args.output)
    per_model = bool(args.keep_heads) or any(r.keep_own for r in recipe.rules)
    outputs = head_output_paths(output, len(args.inputs), args.names) if per_model else [output]
    inputs = (*args.inputs, args.base) if args.base else tuple(args.inputs)
    for out in outputs:
        output_format(out)
        check_output_path(out, force=args.force, inputs=inputs)
    fmt = output_format(outputs[0])

    if args.method in DATA_METHODS:
        return _merge_with_data(args, outputs[0], start)
    if args.domain:
        raise UserError(f"--domain is only read by the methods that use data ({', '.join(DATA_METHODS)})")

    checkpoints: list[Checkpoint] = []
    with contextlib.ExitStack() as stack:
        for path in args.inputs:
            checkpoints.append(stack.enter_context(open_checkpoint(path, trust_pickle=args.trust_pickle)))
        base = stack.enter_context(open_checkpoint(args.base, trust_pickle=args.trust_pickle)) if args.base else None
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
        plan = plan_merge(sources, options, base=base)
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
            "method": args.method,
            "recipe": recipe.record(),
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
        method = "" if args.method == "linear" else \
            f"; method: {args.method} from {Path(args.base).name} (lambda {args.lam:g})"
        print(f"merged {len(args.inputs)} models with weights "
              f"{', '.join(f'{w:.3g}' for w in plan.weights)}; buffers: {args.buffers}{method}")
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
