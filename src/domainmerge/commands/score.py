"""`domainmerge score`: score label-map PNGs written by any framework against ground truth."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
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


def _index(folder: Path, suffix: str) -> dict[str, Path]:
    """Files under ``folder`` ending in ``suffix``, keyed by relative path without the suffix."""
    return {p.relative_to(folder).as_posix()[:-len(suffix)]: p
            for p in sorted(folder.rglob(f"*{suffix}")) if p.is_file()}


def pair_files(pred_dir: Path, gt_dir: Path, pred_suffix: str, gt_suffix: str) -> list[tuple[Path, Path]]:
    """(prediction, ground truth) pairs; every ground-truth file must have a prediction."""
    from domainmerge.errors import UserError

    for folder, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth")):
        if not folder.is_dir():
            raise UserError(f"{folder}: {what} folder not found; pass an existing folder")
    gts = _index(gt_dir, gt_suffix)
    if not gts:
        raise UserError(f"{gt_dir}: no *{gt_suffix} files; set --gt-suffix to the label files' ending")
    preds = _index(pred_dir, pred_suffix)
    by_name: dict[str, list[Path]] = {}
    for stem, path in preds.items():
        by_name.setdefault(stem.rsplit("/", 1)[-1], []).append(path)
    pairs, missing = [], []
    for stem, gt in gts.items():
        pred = preds.get(stem)
        if pred is None and len(by_name.get(stem.rsplit("/", 1)[-1], [])) == 1:
            pred = by_name[stem.rsplit("/", 1)[-1]][0]   # flat prediction folder
        if pred is None:
            missing.append(pred_dir / f"{stem}{pred_suffix}")
        else:
            pairs.append((pred, gt))
    if missing:
        raise UserError(f"{missing[0]}: no such prediction ({len(missing)} of {len(gts)} ground-truth "
                        f"files in {gt_dir} have none); check --pred-suffix ({pred_suffix}) and "
                        f"--gt-suffix ({gt_suffix})")
    return pairs


def _read_label_png(path: Path) -> Any:
    import numpy as np
    from PIL import Image

    from domainmerge.errors import UserError

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "1"):
                raise UserError(f"{path}: image mode {im.mode}; label maps must be single-channel ids")
            arr = np.array(im)
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path}: unreadable image ({exc}); replace or remove the file") from exc
    # 8-bit maps stay uint8 (the metric's fastest input); wider ones become int64.
    return arr if arr.dtype == np.uint8 else arr.astype(np.int64)


def score_folder(pred_dir: Path, gt_dir: Path, *, pred_suffix: str, gt_suffix: str, num_classes: int,
                 ignore_index: int, workers: int = 4, desc: str = "score") -> tuple[Any, int]:
    """SegScores of one prediction folder against one ground-truth folder, and the image count."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from tqdm import tqdm

    from domainmerge.errors import UserError
    from domainmerge.evaluation.metrics import SegMetric

    pairs = pair_files(pred_dir, gt_dir, pred_suffix, gt_suffix)
    metric = SegMetric(num_classes, ignore_index)

    def load(pair: tuple[Path, Path]) -> tuple[Any, Any]:
        return _read_label_png(pair[0]), _read_label_png(pair[1])

    # PNG decoding releases the GIL, so threads overlap it; updates stay in this thread, in order.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for (pred_path, gt_path), (pred, gt) in tqdm(zip(pairs, pool.map(load, pairs)), total=len(pairs),
                                                     desc=desc, unit="img", disable=None):
            if pred.shape != gt.shape:
                raise UserError(f"{pred_path}: size {pred.shape[::-1]} differs from ground truth "
                                f"{gt_path} {gt.shape[::-1]}; predictions must be at label resolution")
            try:
                metric.update(torch.from_numpy(pred), torch.from_numpy(gt))
            except UserError as exc:
                raise UserError(f"{gt_path} / {pred_path}: {exc}") from None
    return metric.compute(), len(pairs)


def run(args: argparse.Namespace) -> int:
    """Score every domain, print the tables, write the requested files."""
    from domainmerge import reporting
    from domainmerge.errors import UserError
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
    if args.num_classes < 1:
        raise UserError(f"--num-classes {args.num_classes}: must be at least 1")
    if not args.num_classes <= args.ignore_index < 65536:
        raise UserError(f"--ignore-index {args.ignore_index}: must be >= --num-classes and < 65536")
    inputs = tuple(p for _, pred, gt in domains for p in (pred, gt))
    outputs = [check_output_path(o, force=args.force, inputs=inputs) for o in (args.json, args.csv) if o]
    if len(set(outputs)) != len(outputs):
        raise UserError("--json and --csv name the same file; give two different paths")

    scores, counts = {}, {}
    for name, pred, gt in domains:
        scores[name], counts[name] = score_folder(
            Path(pred), Path(gt), pred_suffix=args.pred_suffix, gt_suffix=args.gt_suffix,
            num_classes=args.num_classes, ignore_index=args.ignore_index, workers=args.workers, desc=name)

    print(reporting.class_table(scores))
    if len(scores) > 1:
        print()
        print(reporting.domain_table({"mIoU": {n: s.miou for n, s in scores.items()}}, name="Metric"))
    if args.json:
        result: dict[str, Any] = {
            "num_classes": args.num_classes,
            "domains": {n: {"pred": p, "gt": g, "images": counts[n], **scores[n].to_dict()}
                        for n, p, g in domains},
        }
        if len(scores) > 1:
            result["summary"] = reporting.summarize({n: s.miou for n, s in scores.items()})
        reporting.write_json(args.json, result, replace=args.force)
    if args.csv:
        reporting.write_csv(args.csv, reporting.class_rows(scores), replace=args.force)
    for out in outputs:
        print(f"wrote {out}", file=sys.stderr)
    return 0
