"""Dataset readers: pairs of (image, train-id label map) found by file-name suffix.

Every dataset here is a pair of folders walked recursively: an image ``<stem><image_suffix>``
under the image folder pairs with ``<stem><label_suffix>`` at the same relative place under
the label folder (the layouts of the mmseg-based domain-adaptation code the paper, arXiv 2407.13771, builds on:
AIR-DISCOVER/Model-Merging-MTDA, lhoyer/HRDA). Items are
``(image, label, name)``: image uint8 [3, H, W] RGB, label int64 [H, W] in 0..18 and 255, name
the image's relative path without its suffix (for writing predictions next to it).
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from domainmerge.data.classes import IGNORE_INDEX, NUM_CLASSES
from domainmerge.data.labels import (
    CITYSCAPES_ID_TO_TRAIN_ID,
    IDD_CS_TRAIN_ID_TO_TRAIN_ID,
    IDD_LEVEL3_TO_TRAIN_ID,
    IDD_NAME_TO_TRAIN_ID,
)
from domainmerge.errors import CONVERT_LABELS, Option, UserError

Sample = tuple[torch.Tensor, torch.Tensor, str]


@runtime_checkable
class SegDataset(Protocol):
    """A segmentation dataset as every part of domainmerge reads it: ``len()`` and items
    ``(image uint8 [3, H, W], label int64 [H, W] train ids, name)`` (:func:`build_dataset`'s
    readers, the synthetic world, any ``torch.utils.data.Dataset`` of such items). An image-only
    reader (:func:`image_dataset`) fills the label with the ignore index."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


@dataclass(frozen=True)
class RawLabels:
    """Label files in another id space that `convert-labels` turns into train-id files: id PNGs
    with an id -> train id ``mapping``, or (suffix ``.json``) polygon annotations with a label
    name -> train id ``mapping``."""

    suffix: str
    mapping: dict[int, int] | dict[str, int]


@dataclass(frozen=True)
class Layout:
    """Where a dataset keeps images and train-id labels, relative to its root ({split} filled)."""

    image_dir: str
    label_dir: str
    image_suffix: str
    label_suffix: str
    raw_labels: tuple[RawLabels, ...] = ()   # in order of preference
    splits: tuple[str, ...] = ()             # allowed splits; empty = any

    def describe(self, kind: str) -> str:
        """One line showing the expected layout, for error messages."""
        return (f"{kind} layout ROOT/{self.image_dir}/**/*{self.image_suffix} with labels "
                f"ROOT/{self.label_dir}/**/*{self.label_suffix}")


_CS = RawLabels("_gtFine_labelIds.png", CITYSCAPES_ID_TO_TRAIN_ID)

LAYOUTS: dict[str, Layout] = {
    # GTA5 has no split folders: every image is a training image.
    "gta": Layout("images", "labels", ".png", "_labelTrainIds.png",
                  (RawLabels(".png", CITYSCAPES_ID_TO_TRAIN_ID),), splits=("train", "all")),
    "cityscapes": Layout("leftImg8bit/{split}", "gtFine/{split}", "_leftImg8bit.png",
                         "_gtFine_labelTrainIds.png", (_CS,)),
    "idd": Layout("leftImg8bit/{split}", "gtFine/{split}", "_leftImg8bit.png", "_gtFine_labelTrainIds.png",
                  (RawLabels("_gtFine_labelcsTrainIds.png", IDD_CS_TRAIN_ID_TO_TRAIN_ID),
                   RawLabels("_gtFine_labellevel3Ids.png", IDD_LEVEL3_TO_TRAIN_ID),
                   RawLabels("_gtFine_polygons.json", IDD_NAME_TO_TRAIN_ID))),
    "acdc": Layout("rgb_anon/{split}", "gt/{split}", "_rgb_anon.png", "_gt_labelTrainIds.png",
                   (RawLabels("_gt_labelIds.png", CITYSCAPES_ID_TO_TRAIN_ID),)),
    "darkzurich": Layout("rgb_anon/{split}", "gt/{split}", "_rgb_anon.png", "_gt_labelTrainIds.png",
                         (RawLabels("_gt_labelIds.png", CITYSCAPES_ID_TO_TRAIN_ID),)),
}


def _read_header(path: Path) -> tuple[int, int] | str:
    """(width, height) of an image file, or the reason it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError, ValueError) as exc:
        return f"unreadable image ({type(exc).__name__}: {exc})"


def load_image(path: str | Path) -> torch.Tensor:
    """An image file as a uint8 [3, H, W] RGB tensor."""
    try:
        with Image.open(path) as im:
            arr = np.array(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path}: unreadable image ({exc}); replace or remove the file") from exc
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def read_label_map(path: str | Path) -> np.ndarray:
    """The ids of a single-channel label map (PNG of train ids, ground truth or prediction),
    values unchecked: uint8 for 8-bit maps (the metric's fastest input), else int64."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "1"):
                raise UserError(f"{path}: label image has mode {im.mode}; labels must be single-channel "
                                "train ids (colour label maps are not accepted)")
            # np.array of a 'P' image gives palette indices, which are the ids (no colour lookup).
            arr = np.array(im)
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path}: unreadable label image ({exc}); replace or remove the file") from exc
    return arr if arr.dtype == np.uint8 else arr.astype(np.int64)


def load_label(path: str | Path, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """A single-channel train-id PNG as an int64 [H, W] tensor, values checked (0..C-1, 255)."""
    arr = read_label_map(path).astype(np.int64, copy=False)
    bad = ((arr >= num_classes) & (arr != IGNORE_INDEX)) | (arr < 0)
    if bad.any():
        value = int(arr[bad].flat[0])
        raise UserError(f"{path}: label value {value} is not a train id (0-{num_classes - 1} or 255); "
                        "convert raw ids first (", CONVERT_LABELS, ")")
    return torch.from_numpy(arr)


class PairedFolderDataset(torch.utils.data.Dataset[Sample]):
    """Images under ``image_root`` paired by suffix with labels under ``label_root``.

    ``strict``: a missing or unreadable partner file, or an image/label size mismatch, raises
    UserError naming the path and ``layout``; otherwise the item is skipped, counted in a
    warning and listed in ``skipped``. ``labels=False`` reads images only (for unlabelled
    splits) and yields all-255 label maps.
    """

    def __init__(self, image_root: str | Path, label_root: str | Path | None, image_suffix: str,
                 label_suffix: str, *, strict: bool = True, labels: bool = True,
                 layout: str = "") -> None:
        self.image_root = Path(image_root)
        self.label_root = Path(label_root) if label_root is not None else None
        self.image_suffix, self.label_suffix = image_suffix, label_suffix
        self.layout = layout or (f"images ROOT/**/*{image_suffix}, labels *{label_suffix}")
        self.with_labels = labels
        self.skipped: list[tuple[Path, str]] = []
        self.samples: list[tuple[Path, Path | None, str]] = []
        self._strict = strict
        self._scan()

    def _problem(self, path: Path, reason: str) -> None:
        if self._strict:
            raise UserError(f"{path}: {reason}; expected {self.layout} (or skip such files with ",
                            Option("strict", switch=False), ")")
        self.skipped.append((path, reason))

    def _scan(self) -> None:
        if not self.image_root.is_dir():
            raise UserError(f"{self.image_root}: folder not found; expected {self.layout}")
        images = {p.relative_to(self.image_root).as_posix()[:-len(self.image_suffix)]: p
                  for p in sorted(self.image_root.rglob(f"*{self.image_suffix}"))
                  # labels stored beside images (e.g. *_labelTrainIds.png next to *.png) are not images;
                  # with equal suffixes the two live in separate folders and nothing is excluded
                  if p.is_file() and (self.label_suffix == self.image_suffix
                                      or not p.name.endswith(self.label_suffix))}
        if not images:
            raise UserError(f"{self.image_root}: no *{self.image_suffix} images; expected {self.layout}")
        labels: dict[str, Path] = {}
        if self.with_labels:
            if self.label_root is None or not self.label_root.is_dir():
                raise UserError(f"{self.label_root}: folder not found; expected {self.layout}")
            labels = _index(self.label_root, self.label_suffix)
            for stem in sorted(labels.keys() - images.keys()):
                self._problem(labels[stem], f"label without image {self.image_root / stem}{self.image_suffix}")
        for stem, image in images.items():
            label = labels.get(stem)
            if self.with_labels and label is None:
                expected = (self.label_root or Path()) / f"{stem}{self.label_suffix}"
                self._problem(image, f"image without label {expected}")
                continue
            size = _read_header(image)
            if isinstance(size, str):
                self._problem(image, size)
                continue
            if label is not None:
                label_size = _read_header(label)
                if isinstance(label_size, str):
                    self._problem(label, label_size)
                    continue
                if label_size != size:
                    self._problem(label, f"label size {label_size} differs from image size {size}")
                    continue
            self.samples.append((image, label, stem))
        if self.skipped:
            warnings.warn(f"{self.image_root}: skipped {len(self.skipped)} item(s), e.g. "
                          f"{self.skipped[0][0]}: {self.skipped[0][1]}", stacklevel=3)
        if not self.samples:
            raise UserError(f"{self.image_root}: no usable image/label pairs; expected {self.layout}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        image_path, label_path, name = self.samples[index]
        image = load_image(image_path)
        if label_path is None:
            label = torch.full(image.shape[1:], IGNORE_INDEX, dtype=torch.int64)
        else:
            label = load_label(label_path)
        return image, label, name


DatasetFactory = Callable[..., SegDataset]
_FACTORIES: dict[str, DatasetFactory] = {}
# Kinds registered by their own module on import; imported on first use (avoids import cycles).
_PROVIDERS: dict[str, str] = {"synthetic": "domainmerge.data.synthetic"}


def _index(folder: Path, suffix: str) -> dict[str, Path]:
    """Files under ``folder`` ending in ``suffix``, keyed by relative path without the suffix."""
    return {p.relative_to(folder).as_posix()[:-len(suffix)]: p
            for p in sorted(folder.rglob(f"*{suffix}")) if p.is_file()}


def pair_files(pred_dir: str | os.PathLike[str], gt_dir: str | os.PathLike[str], pred_suffix: str = ".png",
               gt_suffix: str = "_labelTrainIds.png") -> list[tuple[Path, Path]]:
    """(prediction, ground truth) pairs of two folders of label maps, in ground-truth order.

    Files pair by their path relative to the folder with the suffix removed or, for a flat
    prediction folder, by file name; every ground-truth file must have a prediction.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for folder, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth")):
        if not folder.is_dir():
            raise UserError(f"{folder}: {what} folder not found; pass an existing folder")
    gts = _index(gt_dir, gt_suffix)
    if not gts:
        raise UserError(f"{gt_dir}: no *{gt_suffix} files; set ", Option("gt_suffix"),
                        " to the label files' ending")
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
                        f"files in {gt_dir} have none); check ", Option("pred_suffix", pred_suffix), " and ",
                        Option("gt_suffix", gt_suffix))
    return pairs


def register_dataset(name: str, factory: DatasetFactory, *, overwrite: bool = False) -> None:
    """Make ``build_dataset(name, root, split, strict=..., **options)`` call ``factory`` with
    the same arguments."""
    if name in _FACTORIES and not overwrite:
        raise ValueError(f"dataset kind {name!r} is already registered")
    _FACTORIES[name] = factory


def dataset_kinds() -> tuple[str, ...]:
    """The names build_dataset accepts."""
    return tuple(sorted(_FACTORIES.keys() | _PROVIDERS.keys()))


def build_dataset(kind: str, root: str | Path, split: str, strict: bool = True,
                  **options: Any) -> SegDataset:
    """The dataset ``kind`` under ``root``: items ``(image uint8 [3,H,W], label int64 [H,W], name)``.

    Args:
        kind: gta, cityscapes, idd, acdc, darkzurich, folder (images and labels in two folders),
            synthetic (the demo's generated world: ``root`` names its domain), or a kind added
            with :func:`register_dataset`.
        root: the dataset's folder, in the layout its authors' code expects (README, "Data").
        split: train, val, ... (the folder level of the layout).
        strict: refuse an image without its label file (False: skip it).
        options: options of the kind's reader (``length``, ``seed``, ``size`` for synthetic).

    Returns:
        A :class:`SegDataset` (a ``torch.utils.data.Dataset``); a missing folder or file raises a
        UserError naming it.

    Example:
        >>> from domainmerge import build_dataset
        >>> val = build_dataset("synthetic", "city", "val", length=2, size=(32, 64))
        >>> image, label, name = val[0]
        >>> image.dtype, tuple(image.shape), tuple(label.shape), name
        (torch.uint8, (3, 32, 64), (32, 64), 'city_val_00000')
    """
    if kind not in _FACTORIES and kind in _PROVIDERS:
        importlib.import_module(_PROVIDERS[kind])
        if kind not in _FACTORIES:
            raise RuntimeError(f"{_PROVIDERS[kind]} does not call register_dataset({kind!r}, ...)")
    factory = _FACTORIES.get(kind)
    if factory is None:
        raise UserError(f"unknown dataset kind {kind!r}; choose one of {', '.join(dataset_kinds())}")
    return factory(root, split, strict=strict, **options)


def image_dataset(kind: str, root: str | Path, split: str, *, strict: bool = True) -> SegDataset:
    """:func:`build_dataset` for reading images only (items still ``(image, label, name)``): the
    readers that can skip labels do, so unlabeled splits (a target's training images) work."""
    images_only = {"labels": False} if kind in LAYOUTS or kind == "folder" else {}
    return build_dataset(kind, root, split, strict=strict, **images_only)


def layout_dataset(kind: str, root: str | Path, split: str, *, strict: bool = True,
                   labels: bool = True) -> PairedFolderDataset:
    """A reader for one of the standard layouts in LAYOUTS."""
    layout = LAYOUTS[kind]
    if layout.splits and split not in layout.splits:
        raise UserError(f"{kind}: split {split!r} does not exist; choose one of {', '.join(layout.splits)}")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: dataset root not found; expected {layout.describe(kind)}")
    return PairedFolderDataset(root / layout.image_dir.format(split=split),
                               root / layout.label_dir.format(split=split),
                               layout.image_suffix, layout.label_suffix, strict=strict,
                               labels=labels, layout=layout.describe(kind))


def folder_dataset(root: str | Path, split: str = "", *, strict: bool = True, labels: bool = True,
                   image_dir: str = "images/{split}", label_dir: str = "labels/{split}",
                   image_suffix: str = ".png", label_suffix: str = ".png") -> PairedFolderDataset:
    """Any pair of folders: ROOT/image_dir/**/*image_suffix with ROOT/label_dir/**/*label_suffix.

    ``{split}`` in the folder names is replaced by ``split`` (an empty split drops it).
    """
    root = Path(root)
    image_root = root / image_dir.format(split=split)
    label_root = root / label_dir.format(split=split)
    layout = f"folder layout {image_root}/**/*{image_suffix} with labels {label_root}/**/*{label_suffix}"
    return PairedFolderDataset(image_root, label_root, image_suffix, label_suffix, strict=strict,
                               labels=labels, layout=layout)


def _layout_factory(kind: str) -> DatasetFactory:
    def factory(root: str | Path, split: str, *, strict: bool = True,
                labels: bool = True) -> PairedFolderDataset:
        return layout_dataset(kind, root, split, strict=strict, labels=labels)
    factory.__doc__ = f"The {kind} reader ({LAYOUTS[kind].describe(kind)})."
    return factory


for _kind in LAYOUTS:
    register_dataset(_kind, _layout_factory(_kind))
register_dataset("folder", folder_dataset)
