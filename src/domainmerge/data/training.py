"""Training samples for self-training: resize, random crop, flip, rare-class sampling.

Every random choice of a sample (which image, rare class, crop box, flip) is a pure function of
(seed, iteration, slot), where slot is the sample's index in the global batch (rank * batch + j).
So resuming at iteration k, or splitting a global batch over torchrun ranks, needs no RNG state
and gives exactly the samples of an uninterrupted single-process run.

The transform chain is the authors' mmseg pipeline (see :mod:`domainmerge.data.transforms`):
``Resize(img_scale, keep_ratio)``, ``RandomCrop(crop, cat_max_ratio)``, ``RandomFlip``, ``Pad``.
Images are drawn independently and uniformly (with replacement) per sample, or by rare-class
sampling (:mod:`domainmerge.data.rcs`) when a sampler is given.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from domainmerge.data.classes import IGNORE_INDEX
from domainmerge.data.rcs import RareClassSampler, rng_for
from domainmerge.data.readers import PairedFolderDataset, load_image, load_label
from domainmerge.data.transforms import (
    apply_box,
    cat_max_ratio_box,
    hflip,
    margin_mask,
    pad_to,
    random_crop_box,
    resize_keep_ratio,
    resize_nearest,
)
from domainmerge.errors import Option, UserError

TRAINSET_STREAM = 0     # rng_for stream of TrainSet's own draws (RareClassSampler uses its own)
RCS_CROP_TRIES = 10     # DAFormer re-draws a rare-class sample's crop up to 10 times


@dataclass(frozen=True)
class CropConfig:
    """Train-time geometry of one domain.

    ``scale``: mmseg ``img_scale`` (W, H); the image is resized keeping its aspect ratio to fit
    (None: native size). ``crop``: (h, w) random crop after resizing, images smaller than it are
    padded (None: the whole image). ``cat_max_ratio``: crops where one class covers this share of
    the labelled pixels, or with fewer than two classes, are re-drawn (up to 10 times; labelled
    sets only). ``flip``: probability of a horizontal flip. ``pseudo_margins``: (top, bottom,
    left, right) pixels of the stored image whose pseudo-labels are not to be trusted (HRDA's
    ``crop_pseudo_margins``, [30, 240, 30, 30] for Cityscapes); when set, samples carry a
    'valid' mask that follows the resize, crop and flip (False in the margins and padding).
    ``margin_size``: (h, w) at which the margins are drawn before the mask is resized to the
    image (HRDA/MTDA datasets' fixed ``valid_mask_size``: 1024x2048 Cityscapes, 1080x1920 IDD,
    ACDC, Dark Zurich), so an image of another size keeps the margins' share; None: the stored
    image's own size."""

    scale: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    cat_max_ratio: float = 0.75
    flip: float = 0.5
    pseudo_margins: tuple[int, int, int, int] | None = None
    margin_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for name, value in (("scale", self.scale), ("crop", self.crop), ("margin_size", self.margin_size)):
            if value is not None and (len(value) != 2 or min(value) < 1):
                raise UserError(f"{name} {value}: must be two positive sizes")
        if not 0.0 <= self.flip <= 1.0:
            raise UserError(f"flip probability {self.flip}: must lie in [0, 1]")
        if self.cat_max_ratio <= 0:
            raise UserError(f"cat_max_ratio {self.cat_max_ratio}: must be positive (1 disables the test)")
        if self.pseudo_margins is not None and (len(self.pseudo_margins) != 4 or min(self.pseudo_margins) < 0):
            raise UserError(f"pseudo_margins {self.pseudo_margins}: must be four sizes >= 0 (top, bottom, left, right)")


# The authors' settings: lhoyer/DAFormer configs/_base_/datasets/uda_gta_to_cityscapes_512x512.py,
# lhoyer/HRDA configs/_base_/datasets/uda_gtaHR_to_cityscapesHR_1024x1024.py and
# AIR-DISCOVER/Model-Merging-MTDA configs/_base_/datasets/uda_gtaHR_to_{iddHR,acdcHR,darkzurichHR}_*.py.
# The source crop is tested with cat_max_ratio 0.75; target crops are placed uniformly, as every
# target pipeline of the authors does (their Cityscapes pipelines load the labels but crop with
# RandomCrop's default cat_max_ratio 1, which tests nothing).
RECIPE_CROP = {"daformer": (512, 512), "hrda": (1024, 1024)}
RECIPE_SCALE: dict[str, dict[str, tuple[int, int]]] = {
    "daformer": {"gta": (1280, 720), "cityscapes": (1024, 512), "idd": (960, 540), "acdc": (960, 540),
                 "darkzurich": (960, 540)},
    "hrda": {"gta": (2560, 1440), "cityscapes": (2048, 1024), "idd": (1920, 1080), "acdc": (1920, 1080),
             "darkzurich": (1920, 1080)},
}

# (h, w) of the pseudo-label margin mask per target kind: the datasets' valid_mask_size in lhoyer/HRDA
# mmseg/datasets/cityscapes.py and AIR-DISCOVER/Model-Merging-MTDA mmseg/datasets/{idd,acdc,dark_zurich}.py.
MARGIN_SIZE: dict[str, tuple[int, int]] = {"cityscapes": (1024, 2048), "idd": (1080, 1920), "acdc": (1080, 1920),
                                           "darkzurich": (1080, 1920)}


def recipe_crops(recipe: str, source_kind: str, target_kind: str) -> tuple[CropConfig, CropConfig]:
    """(source, target) CropConfig of the authors' recipe ('daformer' or 'hrda') for two dataset
    kinds; kinds without a known scale (folder, synthetic) keep their native size."""
    if recipe not in RECIPE_CROP:
        raise UserError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPE_CROP)}")
    scales, crop = RECIPE_SCALE[recipe], RECIPE_CROP[recipe]
    return (CropConfig(scale=scales.get(source_kind), crop=crop, cat_max_ratio=0.75),
            CropConfig(scale=scales.get(target_kind), crop=crop, cat_max_ratio=1.0,
                       margin_size=MARGIN_SIZE.get(target_kind)))


class TrainSet(torch.utils.data.Dataset):
    """Transformed training samples of a reader (any ``build_dataset`` object).

    ``labeled=False`` (target domains) never reads labels: crops are placed uniformly and the
    returned label is all 255. ``rcs`` draws the image (and a class the crop must show) for
    labelled source sets. :meth:`sample` is the only way samples are made."""

    def __init__(self, reader: Any, crop: CropConfig, *, seed: int, labeled: bool = True,
                 rcs: RareClassSampler | None = None) -> None:
        if len(reader) == 0:
            raise UserError(f"{_describe(reader)}: the dataset is empty")
        if rcs is not None and not labeled:
            raise ValueError("rare-class sampling needs a labelled set")
        if rcs is not None and len(rcs.counts) != len(reader):
            raise UserError(f"{_describe(reader)}: rare-class statistics cover {len(rcs.counts)} images but "
                            f"the dataset has {len(reader)}; rebuild them (delete the cache file)")
        self.reader, self.crop, self.seed, self.labeled, self.rcs = reader, crop, seed, labeled, rcs
        images, labels = getattr(reader, "images", None), getattr(reader, "labels", None)
        # In-memory sets (SyntheticDataset) are indexed directly: no per-item tuple or name.
        self._images = images if isinstance(images, torch.Tensor) and len(images) == len(reader) else None
        self._labels = labels if isinstance(labels, torch.Tensor) and len(labels) == len(reader) else None

    def __len__(self) -> int:
        return len(self.reader)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image ``index`` as stored: (uint8 [3, H, W], int64 [H, W] or None when unlabelled)."""
        if self._images is not None:
            label = self._labels[index] if self.labeled and self._labels is not None else None
            return self._images[index], label
        if isinstance(self.reader, PairedFolderDataset):
            image_path, label_path, _ = self.reader.samples[index]
            if not self.labeled:
                return load_image(image_path), None
            if label_path is None:
                raise UserError(f"{image_path}: no label file, but this training set must be labelled")
            return load_image(image_path), load_label(label_path)
        image, label, _ = self.reader[index]
        return image, (label if self.labeled else None)

    def sample(self, iteration: int, slot: int) -> dict[str, torch.Tensor]:
        """image uint8 [3, h, w], label int64 [h, w] (all 255 when unlabelled), index (int64
        scalar: the image drawn), and 'valid' bool [h, w] when the config has pseudo_margins.
        A pure function of (seed, iteration, slot)."""
        rng = rng_for(self.seed, iteration, slot, TRAINSET_STREAM)
        cls = None
        if self.rcs is not None:
            index, cls = self.rcs.draw(self.seed, iteration, slot)
        else:
            index = int(rng.integers(len(self)))
        image, label = self.load(index)
        valid = None
        if self.crop.pseudo_margins is not None:
            mh, mw = self.crop.margin_size or (image.shape[-2], image.shape[-1])
            valid = margin_mask(mh, mw, self.crop.pseudo_margins)
        if self.crop.scale is not None:
            image, label = resize_keep_ratio(image, label, self.crop.scale)
        if valid is not None and tuple(valid.shape) != tuple(image.shape[-2:]):
            valid = resize_nearest(valid, (image.shape[-2], image.shape[-1]))
        out = self._crop_flip(image, label, valid, rng)
        if self.rcs is not None and cls is not None and self.rcs.min_crop_ratio > 0 and self.crop.crop is not None:
            # DAFormer: re-draw the crop (and flip) until it shows enough of the drawn class; the
            # draw after the last failed test is used unchecked. (Without a crop nothing can change.)
            for _ in range(RCS_CROP_TRIES):
                if int(out["label"].eq(cls).sum()) > self.rcs.min_crop_pixels():
                    break
                out = self._crop_flip(image, label, valid, rng)
        out["index"] = torch.tensor(index)
        return out

    def _crop_flip(self, image: torch.Tensor, label: torch.Tensor | None, valid: torch.Tensor | None,
                   rng: np.random.Generator) -> dict[str, torch.Tensor]:
        crop = self.crop.crop
        if crop is not None:
            h, w = image.shape[-2:]
            if label is not None:
                box = cat_max_ratio_box(label, crop, self.crop.cat_max_ratio, rng)
            else:
                box = random_crop_box(h, w, crop, rng)
            image = apply_box(image, box)
            label = apply_box(label, box) if label is not None else None
            valid = apply_box(valid, box) if valid is not None else None
        if label is None:
            label = torch.full(image.shape[-2:], IGNORE_INDEX, dtype=torch.int64)
        # The flip draw happens on every sample (even with flip 0) so that later draws keep their place.
        if rng.random() < self.crop.flip:
            image, label = hflip(image, label)
            valid = None if valid is None else valid.flip(-1)
        out = {}
        if crop is not None:   # after the flip, as mmseg pads (bottom/right) after RandomFlip
            if valid is not None:
                # padding is never a trusted pseudo-label: the mask takes the label's 255 as False
                _, padded = pad_to(image, valid.to(torch.int64), crop)
                valid = padded == 1
            image, label = pad_to(image, label, crop)
        out["image"], out["label"] = image.contiguous(), label.contiguous()
        if valid is not None:
            out["valid"] = valid.contiguous()
        return out

    def batch(self, iteration: int, first_slot: int, batch_size: int) -> dict[str, torch.Tensor]:
        """Slots ``first_slot .. first_slot + batch_size - 1`` of ``iteration`` stacked:
        {'image': [B, 3, h, w] uint8, 'label': [B, h, w] int64, 'index': [B] int64} and, with
        ``pseudo_margins``, 'valid': [B, h, w] bool."""
        samples = [self.sample(iteration, first_slot + j) for j in range(batch_size)]
        shapes = {tuple(s["image"].shape) for s in samples}
        if len(shapes) > 1:
            raise UserError(f"{_describe(self.reader)}: images of different sizes {sorted(shapes)} in one "
                            "batch; give a crop size")
        return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def _describe(reader: Any) -> str:
    if isinstance(reader, PairedFolderDataset):
        return str(reader.image_root)
    return type(reader).__name__


class _BatchView(torch.utils.data.Dataset):
    """Map-style view whose item ``it`` is this rank's batch of iteration ``it`` (for DataLoader workers)."""

    def __init__(self, dataset: TrainSet, batch_size: int, first_slot: int) -> None:
        self.dataset, self.batch_size, self.first_slot = dataset, batch_size, first_slot

    def __getitem__(self, iteration: int) -> dict[str, torch.Tensor]:
        return self.dataset.batch(iteration, self.first_slot, self.batch_size)


class _Iterations(torch.utils.data.Sampler[int]):
    """start, start + 1, ... without end."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


def _worker_init(_: int) -> None:
    # One thread per loader process: the workers run beside the training process's own threads.
    torch.set_num_threads(1)


def batches(dataset: TrainSet, batch_size: int, *, start_iter: int, rank: int = 0, world_size: int = 1,
            workers: int = 0, pin_memory: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's batches of iterations start_iter, start_iter + 1, ... (endless).

    Rank r gets the global slots r * batch_size .. (r + 1) * batch_size - 1, so the global batch
    is world_size * batch_size samples. ``workers > 0`` prepares batches in DataLoader worker
    processes (prefetching); the batches are identical to ``workers=0``."""
    if batch_size < 1:
        raise UserError(f"batch size {batch_size} must be at least 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if workers < 0:
        raise UserError(Option("workers", workers), ": must be 0 or more")
    first_slot = rank * batch_size
    if workers == 0:
        for iteration in itertools.count(start_iter):
            batch = dataset.batch(iteration, first_slot, batch_size)
            yield {k: v.pin_memory() for k, v in batch.items()} if pin_memory else batch
        return
    loader = torch.utils.data.DataLoader(
        _BatchView(dataset, batch_size, first_slot), batch_size=None, sampler=_Iterations(start_iter),
        num_workers=workers, pin_memory=pin_memory, worker_init_fn=_worker_init, prefetch_factor=2)
    yield from loader
