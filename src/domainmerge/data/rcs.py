"""Rare-class sampling (RCS) of source images, as DAFormer (Hoyer et al., CVPR 2022).

Semantics of lhoyer/DAFormer ``mmseg/datasets/uda_dataset.py`` (``get_rcs_class_probs``,
``UDADataset.get_rare_class_sample``) with its configs' values (``rare_class_sampling=dict(
min_pixels=3000, class_temp=0.01, min_crop_ratio=0.5)``):

- class pixel frequencies f_c over the whole source set (classes present anywhere), counted at
  the labels' native resolution; P(c) = softmax((1 - f_c) / T);
- a drawn class c picks uniformly among the images holding more than ``min_pixels`` pixels of c;
- the image's random crop is re-drawn (up to 10 times) until it holds more than
  ``min_pixels * min_crop_ratio`` pixels of c (done by :class:`domainmerge.data.training.TrainSet`).

One deviation: DAFormer asserts that every present class has a qualifying image; here a class
without one is not drawn (its probability is 0, the others renormalised), so small datasets work.

Per-image class pixel counts are computed once and cached as JSON next to the labels
(:func:`default_cache_path`), falling back to ``$XDG_CACHE_HOME/domainmerge/rcs/`` when the
dataset folder is read-only; the cache is recomputed when the label files change.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from domainmerge.data.classes import NUM_CLASSES
from domainmerge.data.readers import PairedFolderDataset, load_label
from domainmerge.errors import UserError
from domainmerge.fsutil import write_text_atomic

CACHE_VERSION = 1
RCS_STREAM = 1   # keeps RCS draws independent of TrainSet's own draws for the same (seed, it, slot)


def rng_for(seed: int, iteration: int, slot: int, stream: int) -> np.random.Generator:
    """A generator that is a pure function of (seed, iteration, slot, stream)."""
    mask = (1 << 64) - 1
    return np.random.default_rng([seed & mask, iteration & mask, slot & mask, stream & mask])


def count_classes(label: torch.Tensor | np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Pixels of each class 0..num_classes-1 in one label map (255 and others ignored)."""
    flat = torch.as_tensor(label).reshape(-1).to(torch.int64)
    flat = flat[(flat >= 0) & (flat < num_classes)]
    return torch.bincount(flat, minlength=num_classes).numpy().astype(np.int64)


def _count_file(args: tuple[Path, int]) -> np.ndarray:
    return count_classes(load_label(args[0], args[1]), args[1])


def _auto_workers(n: int, workers: int | None) -> int:
    """``workers`` as given, or (None) a process per core up to 8 for more than 500 files."""
    if workers is not None:
        return workers
    return 0 if n <= 500 else min(8, os.cpu_count() or 1)


def class_pixel_counts(reader: Any, num_classes: int = NUM_CLASSES, *, workers: int | None = None,
                       progress: bool = False) -> np.ndarray:
    """[N, num_classes] int64: pixels of each class in each of the reader's label maps.

    In-memory readers (``.labels`` tensor [N, H, W]) are counted in one pass; file readers read
    only their label files, in ``workers`` processes when > 0 (None: automatic), with a
    progress bar when ``progress``."""
    labels = getattr(reader, "labels", None)
    if isinstance(labels, torch.Tensor) and labels.dim() == 3 and len(labels) == len(reader):
        n = len(labels)
        flat = labels.reshape(n, -1).to(torch.int64)
        valid = (flat >= 0) & (flat < num_classes)
        index = torch.arange(n).view(-1, 1).expand_as(flat) * num_classes + flat
        counts = torch.bincount(index[valid], minlength=n * num_classes)
        return counts.view(n, num_classes).numpy().astype(np.int64)
    if isinstance(reader, PairedFolderDataset):
        if not reader.with_labels:
            raise UserError(f"{reader.image_root}: rare-class sampling needs labels; this reader reads images only")
        jobs = [(label, num_classes) for _, label, _ in reader.samples if label is not None]
        bar: dict[str, Any] = {"total": len(jobs), "desc": "rare-class statistics", "unit": "label",
                               "disable": not progress, "leave": False}
        n_workers = _auto_workers(len(jobs), workers)
        if n_workers > 0:
            with ProcessPoolExecutor(min(n_workers, os.cpu_count() or 1)) as pool:
                rows = list(tqdm(pool.map(_count_file, jobs, chunksize=16), **bar))
        else:
            rows = [_count_file(j) for j in tqdm(jobs, **bar)]
        return np.stack(rows).astype(np.int64)
    return np.stack([count_classes(reader[i][1], num_classes) for i in range(len(reader))]).astype(np.int64)


def default_cache_path(reader: Any) -> Path | None:
    """Where the counts of a file reader are cached: beside its label folder,
    ``<label folder>/../domainmerge_rcs_<label folder name>.json`` (e.g. ``GTA/domainmerge_rcs_labels.json``,
    ``cityscapes/gtFine/domainmerge_rcs_train.json``); None for in-memory readers."""
    if isinstance(reader, PairedFolderDataset) and reader.label_root is not None:
        root = reader.label_root
        return root.parent / f"domainmerge_rcs_{root.name}.json"
    return None


def fallback_cache_path(reader: PairedFolderDataset) -> Path:
    """The user cache location used when the dataset folder cannot be written."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(str(Path(reader.label_root or "").resolve()).encode()).hexdigest()[:16]
    return base / "domainmerge" / "rcs" / f"{key}.json"


def _fingerprint(reader: PairedFolderDataset) -> tuple[list[str], str]:
    """The label files' names and a digest of (name, size, mtime): changes when any file does."""
    names, h = [], hashlib.sha256()
    for _, label, name in reader.samples:
        if label is None:
            continue
        st = label.stat()
        names.append(name)
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return names, h.hexdigest()


def _read_cache(path: Path, names: list[str], digest: str, num_classes: int) -> np.ndarray | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        if (obj.get("version") != CACHE_VERSION or obj.get("num_classes") != num_classes
                or obj.get("fingerprint") != digest or obj.get("files") != names):
            return None
        counts = np.asarray(obj["counts"], dtype=np.int64)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return counts if counts.shape == (len(names), num_classes) else None


def cached_class_counts(reader: Any, num_classes: int = NUM_CLASSES, *, cache: str | Path | None = "auto",
                        workers: int | None = None, progress: bool = False) -> tuple[np.ndarray, Path | None]:
    """Per-image class pixel counts, read from or written to the cache; returns (counts, cache
    file used or None). ``cache``: 'auto' (:func:`default_cache_path`, then the user cache
    folder if that is not writable), an explicit JSON path, or None (no caching).

    Under torch.distributed, rank 0 reads or computes (and writes) them and the other ranks
    receive them, so a torchrun job reads the label files once."""
    if not isinstance(reader, PairedFolderDataset):
        return class_pixel_counts(reader, num_classes, workers=workers, progress=progress), None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shared: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                counts, path = _cached_counts(reader, num_classes, cache, workers, progress)
                shared = [(counts.tolist(), None if path is None else str(path), None)]
            except UserError as exc:   # every rank must leave the broadcast, and fail alike
                shared = [(None, None, exc)]
        dist.broadcast_object_list(shared, src=0)
        rows, where, error = shared[0]
        if error is not None:
            raise error   # the same error (type and options) on every rank
        return np.asarray(rows, dtype=np.int64).reshape(-1, num_classes), None if where is None else Path(where)
    return _cached_counts(reader, num_classes, cache, workers, progress)


def _cached_counts(reader: PairedFolderDataset, num_classes: int, cache: str | Path | None,
                   workers: int | None, progress: bool) -> tuple[np.ndarray, Path | None]:
    if cache is None:
        return class_pixel_counts(reader, num_classes, workers=workers, progress=progress), None
    names, digest = _fingerprint(reader)
    candidates = ([p for p in (default_cache_path(reader), fallback_cache_path(reader)) if p is not None]
                  if cache == "auto" else [Path(cache)])
    for path in candidates:
        counts = _read_cache(path, names, digest, num_classes)
        if counts is not None:
            return counts, path
    counts = class_pixel_counts(reader, num_classes, workers=workers, progress=progress)
    text = json.dumps({"version": CACHE_VERSION, "num_classes": num_classes, "fingerprint": digest,
                       "files": names, "counts": counts.tolist()})
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, text)
            return counts, path
        except OSError:
            continue
    warnings.warn(f"rare-class statistics could not be cached (tried {', '.join(map(str, candidates))})",
                  stacklevel=2)
    return counts, None


def class_probabilities(counts: np.ndarray, temperature: float) -> np.ndarray:
    """DAFormer's P(c) = softmax((1 - f_c) / T) over classes present in ``counts`` ([N, C]);
    f_c = pixels of c / pixels of all present classes; absent classes get 0."""
    total = counts.sum(axis=0).astype(np.float64)
    present = total > 0
    probs = np.zeros(len(total))
    if present.any():
        z = (1.0 - total[present] / total[present].sum()) / temperature
        z = np.exp(z - z.max())
        probs[present] = z / z.sum()
    return probs


class RareClassSampler:
    """Draws (source image index, class) pairs with DAFormer's rare-class sampling.

    ``counts``: [N, C] class pixel counts per image. ``class_probabilities`` [C] is the
    probability of drawing each class (0 for classes absent or without an image holding more
    than ``min_pixels`` of them); ``samples_with_class[c]`` the qualifying image indices."""

    def __init__(self, counts: np.ndarray | Sequence[Sequence[int]], *, temperature: float = 0.01,
                 min_pixels: int = 3000, min_crop_ratio: float = 0.5) -> None:
        counts = np.asarray(counts, dtype=np.int64)
        if counts.ndim != 2 or len(counts) == 0:
            raise UserError("rare-class sampling: no labelled source images to sample from")
        if temperature <= 0:
            raise UserError(f"rare-class sampling: temperature {temperature} must be positive")
        self.counts = counts
        self.temperature, self.min_pixels, self.min_crop_ratio = temperature, min_pixels, min_crop_ratio
        probs = class_probabilities(counts, temperature)
        self.samples_with_class: dict[int, np.ndarray] = {}
        for c in np.flatnonzero(probs > 0):
            images = np.flatnonzero(counts[:, c] > min_pixels)
            if len(images):
                self.samples_with_class[int(c)] = images
            else:
                probs[c] = 0.0
        if probs.sum() <= 0:
            raise UserError(f"rare-class sampling: no image holds more than {min_pixels} pixels of any "
                            "class; lower min_pixels or disable rare-class sampling")
        probs /= probs.sum()
        self._classes = np.flatnonzero(probs > 0)
        self._probs = probs[self._classes]
        self.class_probabilities = torch.from_numpy(probs)

    def draw(self, seed: int, iteration: int, slot: int) -> tuple[int, int]:
        """(image index, class) for the sample ``slot`` of ``iteration``, a pure function of the arguments."""
        rng = rng_for(seed, iteration, slot, RCS_STREAM)
        c = int(rng.choice(self._classes, p=self._probs))
        images = self.samples_with_class[c]
        return int(images[rng.integers(len(images))]), c

    def min_crop_pixels(self) -> float:
        """A re-drawn crop is accepted when it holds more than this many pixels of the class."""
        return self.min_pixels * self.min_crop_ratio

    @classmethod
    def from_dataset(cls, reader: Any, *, temperature: float = 0.01, min_pixels: int = 3000,
                     min_crop_ratio: float = 0.5, cache: str | Path | None = "auto",
                     num_classes: int = NUM_CLASSES, workers: int | None = None,
                     progress: bool = True) -> RareClassSampler:
        """The sampler for a labelled reader, its class statistics from the cache when current
        (see :func:`cached_class_counts`; a progress bar shows while they are computed)."""
        counts, _ = cached_class_counts(reader, num_classes, cache=cache, workers=workers, progress=progress)
        return cls(counts, temperature=temperature, min_pixels=min_pixels, min_crop_ratio=min_crop_ratio)


__all__ = ["RareClassSampler", "cached_class_counts", "class_pixel_counts",
           "class_probabilities", "count_classes", "default_cache_path", "rng_for"]
