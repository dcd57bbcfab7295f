"""`domainmerge convert-labels`: write the *_labelTrainIds.png files the dataset readers expect."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Convert a dataset's raw label ids to the 19 Cityscapes train ids (255 = ignored), writing
*_labelTrainIds.png beside each source label. Sources per dataset:
  gta         labels/*.png (Cityscapes ids)
  cityscapes  gtFine/**/*_gtFine_labelIds.png
  idd         gtFine/**/*_gtFine_labelcsTrainIds.png (from the IDD tools), else
              *_gtFine_labellevel3Ids.png (level-3 ids; lossy, see domainmerge.data.labels), else
              *_gtFine_polygons.json (the release as downloaded; polygons drawn in file order)
  acdc        gt/**/*_gt_labelIds.png
  darkzurich  gt/**/*_gt_labelIds.png
Up-to-date outputs (newer than their source) are skipped, so rerunning is cheap.
--rcs-split SPLIT also counts the pixels of each class per label of SPLIT (e.g. gta train) and
caches them beside the labels for rare-class sampling in `domainmerge adapt`.
"""


def add_parser(subparsers: Any) -> None:
    """Register `convert-labels`."""
    p = subparsers.add_parser("convert-labels", help="convert raw label ids to train-id PNGs",
                              description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", metavar="DATASET", help="gta, cityscapes, idd, acdc or darkzurich")
    p.add_argument("root", metavar="ROOT", help="the dataset's root folder")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    p.add_argument("--rcs-split", action="append", default=[], metavar="SPLIT",
                   help="after converting, cache the rare-class sampling statistics of SPLIT "
                        "(repeatable; e.g. train for gta)")
    p.set_defaults(func=run)


# Library options whose flag is not --name-with-dashes.
FLAGS = {"rcs_splits": "--rcs-split"}


def run(args: argparse.Namespace) -> int:
    """Convert with :func:`domainmerge.data.convert.convert_labels`, print what was done."""
    from domainmerge.data.convert import convert_labels

    done = convert_labels(args.dataset, args.root, workers=args.workers, rcs_splits=args.rcs_split, progress=True)
    print(f"convert-labels {args.dataset}: wrote {done.written}, {done.up_to_date} already up to date, under "
          f"{Path(args.root)}", file=sys.stderr)
    for split, (n, cache) in done.rcs.items():
        print(f"convert-labels {args.dataset} {split}: class statistics of {n} labels in "
              f"{cache or 'memory only (no writable cache folder)'}", file=sys.stderr)
    return 0
