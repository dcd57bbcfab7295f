"""`domainmerge evaluate`: score checkpoints on one or more domains (mIoU per domain, H)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from domainmerge.commands._common import (
    add_domain_argument,
    add_inference_options,
    add_network_options,
    parse_domains,
    protocol_settings,
)

if TYPE_CHECKING:
    from domainmerge.evaluation.checkpoints import Intervals

DESCRIPTION = """\
Evaluate segmentation checkpoints (DAFormer, HRDA, MIC or domainmerge's own; architecture
detected from the keys) on each --domain and print mIoU per domain with the harmonic mean H.

Every checkpoint is scored on every domain, one table row per checkpoint. Checkpoints written
with separate heads (`merge --keep-heads ... --names cs idd` gives merged.cs.pth, merged.idd.pth)
are scored each on its own domain, as one row: this happens with --per-domain (pairing by the
name after the last dot when it names the domains, else by order) and automatically when the
file names end in exactly the domain names.

Test settings (--protocol): by default the authors' protocol for the checkpoint's network
family (HRDA, DAFormer, DeepLabV2) and each domain's dataset kind, e.g. HRDA on Cityscapes:
resize to fit 2048x1024, slide 1024x1024 windows, stride 512; DAFormer: whole images resized to
fit 1024x512. --protocol mtda takes Model-Merging-MTDA's multi-target test configs (IDD at
2048x1024 with 1024 windows); any of --mode/--crop/--stride/--img-scale means --protocol custom.
The settings are printed per domain before it runs and stored in the JSON. Images are resized as
uint8 like mmseg, then normalised; logits are resized to the label size before argmax.

--ci adds 95% bootstrap intervals over the val images (--resamples, --level): every mIoU and H,
and with several checkpoints the paired difference of each against the first (the same
resampled images for both), which tells a real gap from noise.

Runs data-parallel under torchrun (each rank scores a shard; confusion matrices are summed):
  torchrun --nproc_per_node 4 -m domainmerge evaluate CKPT --domain cs cityscapes data/cityscapes
"""


def add_parser(subparsers: Any) -> None:
    """Register `evaluate`."""
    p = subparsers.add_parser("evaluate", help="evaluate checkpoints on domains (mIoU per domain, H)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="+", metavar="CKPT", help="checkpoint files (.pth/.pt/.bin/.safetensors)")
    add_domain_argument(p)
    p.add_argument("--per-domain", action="store_true",
                   help="score the i-th checkpoint on the i-th domain only (separate-head checkpoints)")
    add_network_options(p)
    add_inference_options(p)
    p.add_argument("--hr-crop", nargs=2, type=int, metavar=("H", "W"),
                   help="HRDA detail crop size (default 512 512, as HRDA trains)")
    p.add_argument("--json", metavar="OUT", help="also write the scores as JSON")
    p.add_argument("--save-pred", metavar="DIR", help="write predicted train-id PNGs under DIR/[ROW/]DOMAIN/")
    p.add_argument("--ci", action="store_true",
                   help="bootstrap confidence intervals over images for every mIoU, H and paired difference")
    p.add_argument("--resamples", type=int, help="bootstrap resamples for --ci (default 1000)")
    p.add_argument("--level", type=float, help="interval level for --ci (default 0.95)")
    p.add_argument("--ci-seed", type=int, help="seed of the bootstrap resampling for --ci (default 0)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing --json file and predicted PNGs under --save-pred")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="evaluate a checkpoint even when some of its tensors hold NaN or infinite values")
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes on stderr")
    p.set_defaults(func=run)


def _print_intervals(ci: Intervals) -> None:
    """The bootstrap intervals (:meth:`Evaluation.intervals`) as tables."""
    from domainmerge import reporting

    pct = f"{ci.level * 100:g}%"
    print(f"\n{pct} bootstrap intervals over images ({ci.resamples} resamples, percentile):")
    print(reporting.interval_table(ci.intervals))
    if ci.differences:
        print(f"\nPaired difference against {ci.reference} (the same resampled images for both), "
              f"{pct} interval:")
        print(reporting.interval_table(ci.differences, name=f"Model - {ci.reference}", signed=True))


def run(args: argparse.Namespace) -> int:
    """Evaluate with :func:`domainmerge.evaluation.checkpoints.evaluate_checkpoints`, print the
    table on rank 0, write the requested files."""
    from domainmerge import reporting
    from domainmerge.evaluation.bootstrap import check_settings
    from domainmerge.evaluation.checkpoints import evaluate_checkpoints
    from domainmerge.fsutil import check_output_dir, check_output_path
    from domainmerge.runtime import distributed
    from domainmerge.runtime.device import resolve_device

    domains = parse_domains(args.domain, "val")
    # Every output is checked before any work: a late failure would waste the whole evaluation.
    if args.json:
        check_output_path(args.json, force=args.force, inputs=tuple(args.ckpts))
    if args.save_pred:
        check_output_dir(args.save_pred, option="--save-pred")
    ci_only = [flag for flag, value in (("--resamples", args.resamples), ("--level", args.level),
                                        ("--ci-seed", args.ci_seed)) if value is not None]
    if ci_only and not args.ci:
        from domainmerge.errors import UserError

        raise UserError(f"{' and '.join(ci_only)} only apply with --ci (the bootstrap intervals); "
                        "add --ci or drop them")
    args.resamples = 1000 if args.resamples is None else args.resamples
    args.level = 0.95 if args.level is None else args.level
    args.ci_seed = 0 if args.ci_seed is None else args.ci_seed
    if args.ci:
        check_settings(args.resamples, args.level)

    with distributed.process_group_from_env():
        main = distributed.is_main_process()

        def stderr(line: str) -> None:
            print(line, file=sys.stderr)

        result = evaluate_checkpoints(
            list(args.ckpts), domains, per_domain=args.per_domain, arch=args.arch, prefix=args.prefix,
            trust_pickle=args.trust_pickle, allow_nonfinite=args.allow_nonfinite,
            hr_crop=(args.hr_crop[0], args.hr_crop[1]) if args.hr_crop else None, **protocol_settings(args),
            device=resolve_device(args.device),
            batch_size=args.batch_size, num_classes=args.num_classes, amp=args.amp, workers=args.workers,
            strict=not args.no_strict, save_pred=args.save_pred, force=args.force, per_image=args.ci,
            progress=not args.quiet,
            log=stderr if main and not args.quiet else None, warn=stderr if main else None)
    if not main:
        return 0
    scores_of = result.scores
    mious = {r: {d: s.miou for d, s in per.items()} for r, per in scores_of.items()}
    if len(scores_of) == 1:
        print(reporting.class_table(next(iter(scores_of.values()))))
        print()
    print(reporting.domain_table(mious, domains=[d[0] for d in domains]))
    ci = result.intervals(resamples=args.resamples, level=args.level, seed=args.ci_seed) if args.ci else None
    if ci is not None:
        _print_intervals(ci)
    if args.json:
        out = result.to_dict(ci)
        try:
            reporting.write_json(args.json, out, replace=args.force)
        except BaseException:
            result.remove_predictions()  # all outputs or none
            raise
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
