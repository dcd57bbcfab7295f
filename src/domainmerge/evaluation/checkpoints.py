"""Evaluating checkpoint files on datasets (the library behind ``domainmerge evaluate``): every
checkpoint on every domain, or separate-head checkpoints each on its own domain, with each
domain's test protocol, predictions optionally saved as PNGs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from domainmerge.errors import Option, OutputExistsError, UserError
from domainmerge.evaluation.inference import evaluate_with
from domainmerge.evaluation.metrics import SegScores

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Job:
    """One (table row, checkpoint, domain) evaluation."""

    row: str
    ckpt: str
    domain: str


def _suffix(path: str) -> str:
    """'out/merged.cs.pth' -> 'cs' (the name a merge with ``keep_heads`` and ``names`` puts before the suffix)."""
    stem = Path(path).stem
    return stem.rsplit(".", 1)[-1] if "." in stem else ""


def _row_names(ckpts: list[str]) -> list[str]:
    """Table row names: file stems, made unique with the parent folder when they clash."""
    stems = [Path(c).stem for c in ckpts]
    return [f"{Path(c).parent.name}/{s}" if stems.count(s) > 1 else s for c, s in zip(ckpts, stems)]


def plan_jobs(ckpts: list[str], domains: list[str], per_domain: bool) -> tuple[list[Job], str]:
    """The evaluations to run and a note on how checkpoints were paired with domains.

    Every checkpoint on every domain (one row per checkpoint), or with ``per_domain`` (implied
    when the file names end in exactly the domain names, as ``merged.cs.pth``,
    ``merged.idd.pth``) the i-th checkpoint on its own domain, all in one row.
    """
    by_name = [_suffix(c) for c in ckpts]
    names_match = len(ckpts) == len(domains) and sorted(by_name) == sorted(domains)
    if per_domain or (names_match and len(ckpts) > 1):
        if len(ckpts) != len(domains):
            raise UserError(Option("per_domain", switch=True), f" needs one checkpoint per domain: got {len(ckpts)} "
                            f"checkpoints for {len(domains)} domains")
        pairs = dict(zip(by_name, ckpts)) if names_match else dict(zip(domains, ckpts))
        stem = Path(pairs[domains[0]]).stem
        base = stem.rsplit(".", 1)[0] if names_match else "per-domain"
        row = f"{base} (per-domain)"
        how = "by file name" if names_match else "by order"
        note = f"per-domain checkpoints, paired {how}: " + ", ".join(f"{d} <- {pairs[d]}" for d in domains)
        return [Job(row, pairs[d], d) for d in domains], note
    rows = _row_names(ckpts)
    return [Job(r, c, d) for r, c in zip(rows, ckpts) for d in domains], ""


def load_network(path: PathLike, *, arch: str = "auto", prefix: str = "auto", trust_pickle: bool = False,
                 allow_nonfinite: bool = False, hr_crop: tuple[int, int] | None = None,
                 warn: Callable[[str], None] | None = None) -> tuple[nn.Module, str, str]:
    """The network in a checkpoint file (wrapper ``prefix`` stripped, ``arch`` detected or
    named, HRDA's detail crop ``hr_crop``), its description and its family (for the test
    protocol). Non-finite tensors are refused unless ``allow_nonfinite`` (then ``warn`` is told)."""
    from domainmerge.checkpoint import load_state_dict, strip_model_prefix
    from domainmerge.evaluation.protocols import family_of
    from domainmerge.models import model_from_state_dict, resolve_spec
    from domainmerge.tensors import nonfinite_keys, nonfinite_message

    sd = strip_model_prefix(load_state_dict(path, trust_pickle=trust_pickle), prefix)
    bad = nonfinite_keys(sd)
    if bad:
        message = nonfinite_message(str(path), bad)
        if not allow_nonfinite:
            raise UserError(f"{message}; pass ", Option("allow_nonfinite", switch=True), " to evaluate it anyway")
        if warn is not None:
            warn(f"warning: {message}")
    overrides = {"hr_crop_size": tuple(hr_crop)} if hr_crop else {}
    try:
        spec = resolve_spec(sd, arch, **overrides)
        return model_from_state_dict(sd, arch, **overrides), spec.describe(), family_of(spec)
    except UserError as exc:
        raise exc.prefixed(f"{path}: ") from None


def _prediction_writer(folder: Path, created: list[Path], force: bool) -> Callable[[str, Any], None]:
    """A writer of predicted PNGs under ``folder``; files and folders it creates go to ``created``.
    An existing PNG is replaced only with ``force``."""
    import numpy as np
    from PIL import Image

    from domainmerge.fsutil import atomic_path

    def write(name: str, pred: Any) -> None:
        target = folder / f"{name}.png"
        # Recorded before they exist, so that a signal at any point leaves nothing unrecorded.
        created.extend(reversed([p for p in (target.parent, *target.parent.parents) if not p.exists()]))
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            created.append(target)
        with atomic_path(target, replace=force) as tmp:
            Image.fromarray(pred.numpy().astype(np.uint8), mode="L").save(tmp, format="PNG")
    return write


def _check_prediction_folders(folders: Sequence[Path], force: bool) -> None:
    """Refuse, before any work, prediction folders that already hold PNGs (unless ``force``)."""
    if force:
        return
    for folder in folders:
        if folder.is_dir() and any(folder.rglob("*.png")):
            raise OutputExistsError(folder, ": holds predicted PNGs of an earlier run; pass ",
                                    Option("force", switch=True), " to overwrite them, or choose another folder")


@dataclass
class Evaluation:
    """:func:`evaluate_checkpoints`' result.

    ``scores[row][domain]``: :class:`SegScores` (with ``per_image`` when asked for);
    ``results[row]``: JSON-ready ``{"checkpoints", "arch", "protocol", "domains"}`` per domain;
    ``note``: how checkpoints were paired with domains; ``predictions``: the files and folders
    written under ``save_pred`` (:meth:`remove_predictions` undoes them).
    """

    scores: dict[str, dict[str, SegScores]] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    note: str = ""
    predictions: list[Path] = field(default_factory=list)

    def remove_predictions(self) -> None:
        """Remove the predictions written (files, then the folders made, deepest first)."""
        _remove_created(self.predictions)


def _remove_created(created: list[Path]) -> None:
    for path in reversed(created):
        with contextlib.suppress(OSError):
            path.rmdir() if path.is_dir() else path.unlink()


def check_run_settings(batch_size: int | None, workers: int | None, max_windows: int | None) -> None:
    """The inference settings every scoring entry point takes, checked before any work."""
    if batch_size is not None and batch_size < 1:
        raise UserError(Option("batch_size", batch_size), ": must be at least 1")
    if workers is not None and workers < 0:
        raise UserError(Option("workers", workers), ": must be 0 or more")
    if max_windows is not None and max_windows < 1:
        raise UserError(Option("max_windows", max_windows), ": must be at least 1")


def evaluate_checkpoints(ckpts: Sequence[PathLike], domains: Sequence[tuple[str, str, str, str]], *,
                         per_domain: bool = False, arch: str = "auto", prefix: str = "auto",
                         trust_pickle: bool = False, allow_nonfinite: bool = False,
                         hr_crop: tuple[int, int] | None = None, protocol: str | None = None,
                         mode: str | None = None, crop: tuple[int, int] | None = None,
                         stride: tuple[int, int] | None = None, img_scale: tuple[int, int] | None = None,
                         max_windows: int | None = None, device: str = "cpu", batch_size: int | None = None,
                         num_classes: int = 19, amp: str | None = None, workers: int | None = None,
                         strict: bool = True, save_pred: PathLike | None = None, force: bool = False,
                         per_image: bool = False, progress: bool = False, log: Callable[[str], None] | None = None,
                         warn: Callable[[str], None] | None = None) -> Evaluation:
    """Score every checkpoint on every domain (or, see :func:`plan_jobs`, each on its own).

    Args:
        ckpts: checkpoint files. domains: ``(name, dataset kind, root, split)``.
        per_domain: the i-th checkpoint on the i-th domain only (separate-head checkpoints).
        arch, prefix, trust_pickle, allow_nonfinite, hr_crop: how to read the networks
            (:func:`load_network`).
        protocol, mode, crop, stride, img_scale: the test settings per (network family, dataset
            kind) (:func:`domainmerge.evaluation.protocols.resolve`); ``max_windows``: windows per
            forward in slide mode.
        device, batch_size, num_classes, amp, workers, strict: as
            :func:`domainmerge.evaluation.inference.evaluate_model` and the dataset readers take them.
        save_pred: write predicted train-id PNGs under ``save_pred/[ROW/]DOMAIN/`` (all removed
            again if the evaluation fails); folders that hold PNGs already are refused unless
            ``force``.
        per_image: keep per-image counts (``scores.per_image``) for bootstrap intervals.
        progress: progress bars; ``log``: called with what runs next; ``warn``: with warnings.
        Under torchrun each rank scores a shard and the counts are summed.

    Returns:
        An :class:`Evaluation`.
    """
    from domainmerge.data import build_dataset
    from domainmerge.evaluation.protocols import check_protocol_settings, resolve

    jobs, note = plan_jobs([str(c) for c in ckpts], [d[0] for d in domains], per_domain)
    for c in ckpts:
        if not Path(c).is_file():
            raise UserError(f"{c}: checkpoint not found; check the path")
    check_run_settings(batch_size, workers, max_windows)
    check_protocol_settings(protocol, mode=mode, crop=crop, stride=stride, img_scale=img_scale)
    several_rows = len({j.row for j in jobs}) > 1
    if save_pred is not None:
        _check_prediction_folders([Path(save_pred) / (j.row if several_rows else "") / j.domain for j in jobs],
                                  force)
    if note and warn is not None:
        warn(note)
    # Build every dataset first: a wrong path fails before any network is loaded.
    datasets: dict[str, Any] = {name: build_dataset(kind, root, split, strict=strict)
                                for name, kind, root, split in domains}
    kinds = {name: kind for name, kind, _, _ in domains}
    result = Evaluation(note=note)
    loaded: tuple[str, Any, str, str] | None = None
    try:
        for job in jobs:
            if loaded is None or loaded[0] != job.ckpt:
                loaded = None  # free the previous network before loading the next (no other reference)
                loaded = (job.ckpt, *load_network(job.ckpt, arch=arch, prefix=prefix, trust_pickle=trust_pickle,
                                                  allow_nonfinite=allow_nonfinite, hr_crop=hr_crop, warn=warn))
                if log is not None:
                    log(f"{job.ckpt}: {loaded[2]}")
            proto = resolve(loaded[3], kinds[job.domain], protocol, mode=mode, crop=crop, stride=stride,
                            img_scale=img_scale)
            if log is not None:
                log(f"{job.row} | {job.domain}: {proto.describe()}")
            save = None
            if save_pred is not None:
                sub = Path(save_pred) / (job.row if several_rows else "") / job.domain
                save = _prediction_writer(sub, result.predictions, force)
            scores = evaluate_with(loaded[1], datasets[job.domain], proto, device=device, batch_size=batch_size,
                                   num_classes=num_classes, amp=amp, workers=workers, max_windows=max_windows,
                                   progress=progress, desc=f"{job.row} | {job.domain}", on_prediction=save,
                                   per_image=per_image)
            row = result.results.setdefault(job.row, {"checkpoints": {}, "arch": {}, "protocol": {}, "domains": {}})
            row["checkpoints"][job.domain] = job.ckpt
            row["arch"][job.domain] = loaded[2]
            row["protocol"][job.domain] = proto.to_dict()
            row["domains"][job.domain] = {"images": len(datasets[job.domain]), **scores.to_dict()}
            result.scores.setdefault(job.row, {})[job.domain] = scores
    except BaseException:
        result.remove_predictions()  # no partial folder left
        raise
    return result
