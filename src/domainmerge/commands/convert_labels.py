"""`domainmerge convert-labels`: write the *_labelTrainIds.png files the dataset readers expect."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import numpy as np

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


LabelMapping = dict[int, int] | dict[str, int]   # ids (PNG sources) or label names (JSON sources) -> train ids


def plan_conversions(dataset: str, root: Path) -> list[tuple[Path, Path, LabelMapping]]:
    """(source, target, mapping) for every raw label file of ``dataset`` under ``root``."""
    from domainmerge.data.readers import LAYOUTS
    from domainmerge.errors import UserError

    layout = LAYOUTS.get(dataset)
    if layout is None or not layout.raw_labels:
        raise UserError(f"convert-labels: unknown dataset {dataset!r}; choose one of "
                        f"{', '.join(k for k, v in LAYOUTS.items() if v.raw_labels)}")
    # Convert every split at once: walk the label folder above its {split} part.
    label_root = root / layout.label_dir.split("{split}")[0]
    if not label_root.is_dir():
        raise UserError(f"{label_root}: folder not found; expected {layout.describe(dataset)}")
    plan: dict[Path, tuple[Path, LabelMapping]] = {}
    for raw in layout.raw_labels:   # earlier sources win when several exist for one image
        for src in sorted(label_root.rglob(f"*{raw.suffix}")):
            if not src.is_file() or src.name.endswith(layout.label_suffix):
                continue
            target = src.with_name(src.name[:-len(raw.suffix)] + layout.label_suffix)
            plan.setdefault(target, (src, raw.mapping))
    if not plan:
        sources = " or ".join(f"*{r.suffix}" for r in layout.raw_labels)
        raise UserError(f"{label_root}: no raw label files ({sources}); expected {layout.describe(dataset)}")
    return [(src, target, mapping) for target, (src, mapping) in sorted(plan.items())]


def convert_one(src: Path, target: Path, mapping: LabelMapping) -> bool:
    """Write ``target`` from ``src`` unless it is already newer; True if written.

    ``src`` is an id PNG (``mapping``: id -> train id) or, if it ends in .json, a polygon
    annotation (``mapping``: label name -> train id)."""
    from PIL import Image

    from domainmerge.fsutil import atomic_path

    if target.exists() and target.stat().st_mtime >= src.stat().st_mtime:
        return False
    if src.suffix == ".json":
        train_ids = _from_polygons(src, cast("dict[str, int]", mapping))
    else:
        train_ids = _from_ids_png(src, cast("dict[int, int]", mapping))
    with atomic_path(target) as tmp:
        Image.fromarray(train_ids).save(tmp, format="PNG")
    return True


def _from_polygons(src: Path, name_to_id: dict[str, int]) -> np.ndarray:
    import json

    from domainmerge.data.labels import rasterize_polygons
    from domainmerge.errors import UserError

    try:
        obj = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{src}: cannot read polygon JSON ({exc}); replace or remove the file") from exc
    return rasterize_polygons(obj, name_to_id, source=src)


def _from_ids_png(src: Path, mapping: dict[int, int]) -> np.ndarray:
    import numpy as np
    from PIL import Image

    from domainmerge.data.labels import remap
    from domainmerge.errors import UserError

    try:
        with Image.open(src) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise UserError(f"{src}: image mode {im.mode}; raw labels must be single-channel ids")
            ids = np.array(im)
        train_ids = remap(ids, mapping)
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{src}: cannot convert ({exc}); replace or remove the file") from exc
    return train_ids


def _convert_job(job: tuple[Path, Path, LabelMapping]) -> bool:
    return convert_one(*job)


def run(args: argparse.Namespace) -> int:
    """Convert all raw labels of one dataset, showing a progress bar."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    from domainmerge.errors import UserError
    from domainmerge.fsutil import check_output_dir

    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be at least 1")
    root = Path(args.root)
    if not root.is_dir():
        raise UserError(f"{root}: dataset root not found; give the folder that holds the dataset")
    jobs = plan_conversions(args.dataset, root)
    from domainmerge.data.readers import LAYOUTS

    allowed = LAYOUTS[args.dataset].splits
    for split in args.rcs_split:   # checked before converting anything
        if allowed and split not in allowed:
            raise UserError(f"--rcs-split {split}: {args.dataset} has no such split; choose one of "
                            f"{', '.join(allowed)}")
    for folder in sorted({target.parent for _, target, _ in jobs}):
        check_output_dir(folder)  # the labels are written beside the raw ones: check before converting
    bar: dict[str, Any] = {"total": len(jobs), "desc": f"convert {args.dataset}", "unit": "file"}
    if args.workers == 1:
        written = [_convert_job(j) for j in tqdm(jobs, **bar)]
    else:
        with ProcessPoolExecutor(min(args.workers, os.cpu_count() or 1)) as pool:
            written = list(tqdm(pool.map(_convert_job, jobs, chunksize=8), **bar))
    n = sum(written)
    print(f"convert-labels {args.dataset}: wrote {n}, {len(jobs) - n} already up to date, under {root}",
          file=sys.stderr)
    for split in args.rcs_split:
        from domainmerge.data.rcs import cached_class_counts
        from domainmerge.data.readers import layout_dataset

        reader = layout_dataset(args.dataset, root, split)
        counts, cache = cached_class_counts(reader, workers=args.workers if args.workers > 1 else 0,
                                            progress=True)
        print(f"convert-labels {args.dataset} {split}: class statistics of {len(counts)} labels in "
              f"{cache or 'memory only (no writable cache folder)'}", file=sys.stderr)
    return 0
