"""Converting a dataset's raw label ids to the 19 Cityscapes train ids (the library behind
``domainmerge convert-labels``): ``*_labelTrainIds.png`` written beside each source label, from
id PNGs or IDD's polygon JSON (see :data:`domainmerge.data.readers.LAYOUTS` for the sources)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

from domainmerge.errors import Option, UserError

if TYPE_CHECKING:
    import numpy as np


LabelMapping = dict[int, int] | dict[str, int]   # ids (PNG sources) or label names (JSON sources) -> train ids


def plan_conversions(dataset: str, root: Path) -> list[tuple[Path, Path, LabelMapping]]:
    """(source, target, mapping) for every raw label file of ``dataset`` under ``root``."""
    from domainmerge.data.readers import LAYOUTS

    layout = LAYOUTS.get(dataset)
    if layout is None or not layout.raw_labels:
        raise UserError(f"unknown dataset {dataset!r} for label conversion; choose one of "
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

    try:
        obj = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{src}: cannot read polygon JSON ({exc}); replace or remove the file") from exc
    return rasterize_polygons(obj, name_to_id, source=src)


def _from_ids_png(src: Path, mapping: dict[int, int]) -> np.ndarray:
    import numpy as np
    from PIL import Image

    from domainmerge.data.labels import remap

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


@dataclass
class Conversion:
    """What :func:`convert_labels` did: files written, files already up to date, and per
    ``rcs_splits`` entry the number of labels counted and the cache file (None: memory only)."""

    written: int
    up_to_date: int
    rcs: dict[str, tuple[int, Path | None]] = field(default_factory=dict)


def convert_labels(dataset: str, root: str | os.PathLike[str], *, workers: int = 1,
                   rcs_splits: Sequence[str] = (), progress: bool = False) -> Conversion:
    """Write the train-id label files of ``dataset`` under ``root`` (the library behind
    ``domainmerge convert-labels``); files newer than their source are skipped. Every split and
    output folder is checked before anything is converted.

    Args:
        dataset: gta, cityscapes, idd, acdc or darkzurich (the layout and label ids to convert).
        root: the dataset's folder, in its authors' layout.
        workers: conversion processes.
        rcs_splits: splits whose rare-class sampling statistics are then cached
            (:func:`domainmerge.data.rcs.cached_class_counts`).
        progress: progress bars.

    Returns:
        A :class:`Conversion`: files written, files already up to date, the RCS caches.

    Example:
        >>> import tempfile, numpy as np
        >>> from PIL import Image
        >>> from domainmerge import convert_labels
        >>> root = Path(tempfile.mkdtemp())
        >>> folder = root / "gtFine" / "val" / "bremen"
        >>> folder.mkdir(parents=True)
        >>> Image.fromarray(np.array([[7, 26]], np.uint8)).save(folder / "a_gtFine_labelIds.png")
        >>> convert_labels("cityscapes", root)   # Cityscapes id 7 is road (train id 0), 26 car (13)
        Conversion(written=1, up_to_date=0, rcs={})
        >>> np.array(Image.open(folder / "a_gtFine_labelTrainIds.png")).tolist()
        [[0, 13]]
    """
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    from domainmerge.data.readers import LAYOUTS
    from domainmerge.fsutil import check_output_dir

    if workers < 1:
        raise UserError(Option("workers", workers), ": must be at least 1")
    folder = Path(root)
    if not folder.is_dir():
        raise UserError(f"{folder}: dataset root not found; give the folder that holds the dataset")
    jobs = plan_conversions(dataset, folder)
    allowed = LAYOUTS[dataset].splits
    for split in rcs_splits:
        if allowed and split not in allowed:
            raise UserError(Option("rcs_splits", split), f": {dataset} has no such split; choose one of "
                            f"{', '.join(allowed)}")
    for target in sorted({target.parent for _, target, _ in jobs}):
        check_output_dir(target)  # the labels are written beside the raw ones: check before converting
    bar = {"total": len(jobs), "desc": f"convert {dataset}", "unit": "file", "disable": not progress}
    if workers == 1:
        written = [_convert_job(j) for j in tqdm(jobs, **bar)]
    else:
        with ProcessPoolExecutor(min(workers, os.cpu_count() or 1)) as pool:
            written = list(tqdm(pool.map(_convert_job, jobs, chunksize=8), **bar))
    result = Conversion(sum(written), len(jobs) - sum(written))
    for split in rcs_splits:
        from domainmerge.data.rcs import cached_class_counts
        from domainmerge.data.readers import layout_dataset

        reader = layout_dataset(dataset, folder, split)
        counts, cache = cached_class_counts(reader, workers=workers if workers > 1 else 0, progress=progress)
        result.rcs[split] = (len(counts), cache)
    return result
