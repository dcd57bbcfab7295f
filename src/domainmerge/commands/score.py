"""`domainmerge score`: score label-map PNGs written by any framework against ground truth."""

from __future__ import annotations

import argparse
import sys
from typing import Any

DESCRIPTION = """\
Score predicted label maps (single-channel PNGs of train ids) against ground-truth label maps.
Files pair by their path relative to the folder with the suffix removed (or, for a flat
prediction folder, by file name). Prints per-class IoU and mIoU; with several --domain triples
one column per domain plus the harmonic mean H and the mean, like the paper's tables.
"""


def add_parser(subparsers: Any) -> None:
    """Register `score`."""
    p = subparsers.add_parser("score", help="score predicted label PNGs against ground truth",
                              description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", metavar="DIR", help="folder of predicted label maps")
    p.add_argument("--gt", metavar="DIR", help="folder of ground-truth label maps")
    p.add_argument("--name", default="score", help="column name for --pred/--gt (default: score)")
    p.add_argument("--domain", nargs=3, action="append", default=[], metavar=("NAME", "PRED", "GT"),
                   help="a named domain with its prediction and ground-truth folders (repeatable)")
    p.add_argument("--pred-suffix", default=".png", help="prediction file suffix (default: .png)")
    p.add_argument("--gt-suffix", default="_labelTrainIds.png",
                   help="ground-truth file suffix (default: _labelTrainIds.png)")
    p.add_argument("--num-classes", type=int, default=19, help="number of classes (default: 19)")
    p.add_argument("--ignore-index", type=int, default=255, help="ignored label (default: 255)")
    p.add_argument("--workers", type=int, default=4, help="threads decoding PNGs (default: 4)")
    p.add_argument("--json", metavar="OUT", help="also write the scores as JSON")
    p.add_argument("--csv", metavar="OUT", help="also write per-class IoU as CSV")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Score every domain with :func:`domainmerge.evaluation.folders.score_folders`, print the
    tables, write the requested files."""
    from domainmerge import reporting
    from domainmerge.errors import UserError
    from domainmerge.evaluation.folders import check_label_settings, score_folders, scores_json
    from domainmerge.fsutil import check_output_path

    domains: list[tuple[str, str, str]] = [tuple(d) for d in args.domain]  # type: ignore[misc]
    if args.pred or args.gt:
        if not (args.pred and args.gt):
            raise UserError("--pred and --gt go together; give both folders")
        domains.insert(0, (args.name, args.pred, args.gt))
    if not domains:
        raise UserError("nothing to score; give --pred DIR --gt DIR or --domain NAME PRED GT")
    names = [d[0] for d in domains]
    if len(set(names)) != len(names):
        raise UserError(f"domain names must differ, got {names}; rename with --domain NAME or --name")
    check_label_settings(args.num_classes, args.ignore_index)
    inputs = tuple(p for _, pred, gt in domains for p in (pred, gt))
    outputs = [check_output_path(o, force=args.force, inputs=inputs) for o in (args.json, args.csv) if o]
    if len(set(outputs)) != len(outputs):
        raise UserError("--json and --csv name the same file; give two different paths")

    results = score_folders(domains, pred_suffix=args.pred_suffix, gt_suffix=args.gt_suffix,
                            num_classes=args.num_classes, ignore_index=args.ignore_index, workers=args.workers,
                            progress=True)
    scores = {name: r.scores for name, r in results.items()}
    print(reporting.class_table(scores))
    if len(scores) > 1:
        print()
        print(reporting.domain_table({"mIoU": {n: s.miou for n, s in scores.items()}}, name="Metric"))
    if args.json:
        reporting.write_json(args.json, scores_json(results, args.num_classes), replace=args.force)
    if args.csv:
        reporting.write_csv(args.csv, reporting.class_rows(scores), replace=args.force)
    for out in outputs:
        print(f"wrote {out}", file=sys.stderr)
    return 0
