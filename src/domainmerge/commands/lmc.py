"""`domainmerge lmc`: linear mode connectivity curves (or simplex grids) and barriers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from domainmerge.errors import UserError

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
    p.add_argument("--steps", type=int, default=11, help="lambdas from 0 to 1 for 2 models (default 11)")
    p.add_argument("--grid", type=int, default=5, help="points per simplex edge for 3+ models (default 5)")
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
    import torch

    from domainmerge.commands._common import parse_domains
    from domainmerge.evaluation import distributed, lmc
    from domainmerge.fsutil import check_output_dir, check_output_path

    if len(args.ckpts) < 2:
        raise UserError("give at least two checkpoints to interpolate between")
    domains = parse_domains(args.domain, "val")
    k = len(args.ckpts)
    points: list[tuple[float, ...]] = ([(1 - lam, lam) for lam in lmc.lambda_grid(args.steps)] if k == 2
                                       else lmc.simplex_grid(k, args.grid))
    names = [Path(c).stem for c in args.ckpts]
    if len(set(names)) != k:
        names = [f"{i + 1}:{n}" for i, n in enumerate(names)]
    outputs: dict[str, Path] = {}
    if args.out:
        out_dir = check_output_dir(args.out, option="--out")
        plot = "lmc.png" if k == 2 else ("lmc_ternary.png" if k == 3 else None)
        outputs = {n: out_dir / n for n in ("lmc.json", "lmc.md", plot) if n}
        for path in outputs.values():
            if out_dir.is_dir():
                check_output_path(path, force=args.force, inputs=tuple(args.ckpts))

    started_here = not distributed.is_dist() and distributed.init_from_env()
    try:
        return _run(args, k, points, names, domains, outputs)
    finally:
        if started_here:
            torch.distributed.destroy_process_group()


def _run(args: argparse.Namespace, k: int, points: list[tuple[float, ...]], names: list[str],
         domains: list[tuple[str, str, str, str]], outputs: dict[str, Path]) -> int:
    import torch

    from domainmerge import reporting
    from domainmerge.checkpoint import load_state_dict, strip_model_prefix
    from domainmerge.commands._common import resolve_device, resolve_protocol
    from domainmerge.data import build_dataset
    from domainmerge.evaluation import distributed, lmc
    from domainmerge.evaluation.inference import evaluate_model
    from domainmerge.evaluation.protocols import family_of
    from domainmerge.merging import DictSource, MergeOptions, nonfinite_keys, plan_merge
    from domainmerge.models import model_from_state_dict, resolve_spec

    main = distributed.is_main_process()
    device = resolve_device(args.device)
    datasets = {name: build_dataset(kind, root, split, strict=not args.no_strict)
                for name, kind, root, split in domains}
    state_dicts = [strip_model_prefix(load_state_dict(c, trust_pickle=args.trust_pickle), args.prefix)
                   for c in args.ckpts]
    for c, sd in zip(args.ckpts, state_dicts):
        bad = nonfinite_keys(sd)
        if bad:
            raise UserError(f"{c}: {len(bad)} tensors hold NaN or infinite values (e.g. {bad[0]!r}); the "
                            "checkpoint is damaged or diverged")
    # The interpolation merges in memory; check first, naming the files and lmc's own options.
    plan_merge([DictSource(sd, c) for sd, c in zip(state_dicts, args.ckpts)],
               MergeOptions(buffers=args.buffers, mismatch_advice=("lmc needs models of one architecture with the "
                                                                   "same keys; check --prefix and --arch",)))
    if args.align:
        from domainmerge.alignment.matching import align_state_dicts

        for i in range(1, k):
            state_dicts[i], report = align_state_dicts(state_dicts[0], state_dicts[i])
            if main:
                print(f"aligned {names[i]} to {names[0]}: {100 * report.overall:.1f}% of units in place",
                      file=sys.stderr)
    try:
        model = model_from_state_dict(state_dicts[0], args.arch)
        family = family_of(resolve_spec(state_dicts[0], args.arch))
    except UserError as exc:
        raise exc.prefixed(f"{args.ckpts[0]}: ") from None
    protos = {name: resolve_protocol(args, family, kind) for name, kind, _, _ in domains}
    if main:
        for name, proto in protos.items():
            print(f"{name}: {proto.describe()}", file=sys.stderr)

    def score(merged: dict[str, torch.Tensor]) -> dict[str, float]:
        model.load_state_dict(merged)
        return {name: evaluate_model(
                    model, ds, mode=protos[name].mode, crop=protos[name].crop or (1024, 1024),
                    stride=protos[name].stride or (512, 512), device=device, batch_size=args.batch_size,
                    num_classes=args.num_classes, img_scale=protos[name].img_scale, amp=args.amp,
                    workers=args.workers, progress=False, desc=name, max_windows=args.max_windows).miou
                for name, ds in datasets.items()}

    from tqdm import tqdm

    bar = tqdm(points, desc="lmc", unit="point", disable=args.quiet or not main)
    rows = lmc.scan(state_dicts, bar, score, buffers=args.buffers)
    summary = lmc.barriers(rows)
    if not main:
        return 0
    text = lmc.render(rows, summary, names)
    print(text, end="")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        record = {"checkpoints": list(args.ckpts), "names": names, "buffers": args.buffers, "aligned": args.align,
                  "domains": {d[0]: {"dataset": d[1], "root": d[2], "split": d[3]} for d in domains},
                  "protocol": {name: proto.to_dict() for name, proto in protos.items()},
                  "points": rows, "barriers": summary}
        reporting.write_json(outputs["lmc.json"], record, replace=args.force)
        reporting.write_markdown(outputs["lmc.md"], text, replace=args.force)
        if k == 2:
            lmc.plot_curve(rows, names, outputs["lmc.png"])
        elif k == 3:
            lmc.plot_ternary(rows, names, outputs["lmc_ternary.png"])
        print(f"wrote {', '.join(str(p) for p in outputs.values())}")
    return 0
