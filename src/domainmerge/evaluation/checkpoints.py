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
from domainmerge.evaluation.bootstrap import Interval
from domainmerge.evaluation.inference import evaluate_with
from domainmerge.evaluation.metrics import SegScores
from domainmerge.evaluation.protocols import Protocol

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
    from domainmerge.evaluation.protocols import family_of
    from domainmerge.models import StoredNetwork
    from domainmerge.tensors import nonfinite_keys, nonfinite_message

    with StoredNetwork.open(path, prefix=prefix, trust_pickle=trust_pickle) as stored:
        sd = stored.state_dict()
        bad = nonfinite_keys(sd)
        if bad:
            message = nonfinite_message(str(path), bad)
            if not allow_nonfinite:
                raise UserError(f"{message}; pass ", Option("allow_nonfinite", switch=True), " to evaluate it anyway")
            if warn is not None:
                warn(f"warning: {message}")
        overrides = {"hr_crop_size": tuple(hr_crop)} if hr_crop else {}
        spec = stored.spec(arch, sd, **overrides)
        return stored.build(arch, sd, **overrides), spec.describe(), family_of(spec)


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
class RowScores:
    """One table row (a checkpoint, or separate-head checkpoints each on its own domain), per
    domain: the file scored, the network found, the test protocol, the images and the scores."""

    checkpoints: dict[str, str] = field(default_factory=dict)
    arch: dict[str, str] = field(default_factory=dict)
    protocol: dict[str, Protocol] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    scores: dict[str, SegScores] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``{"checkpoints", "arch", "protocol", "domains": {domain: {"images", **scores}}}`` and,
        over two or more domains, ``"H"`` and ``"mean"`` of the mIoUs."""
        from domainmerge.reporting import summarize

        out: dict[str, Any] = {
            "checkpoints": dict(self.checkpoints), "arch": dict(self.arch),
            "protocol": {d: p.to_dict() for d, p in self.protocol.items()},
            "domains": {d: {"images": self.images[d], **s.to_dict()} for d, s in self.scores.items()}}
        if len(self.scores) > 1:
            out.update(summarize({d: s.miou for d, s in self.scores.items()}))
        return out


@dataclass(frozen=True)
class EvaluationSettings:
    """What :func:`evaluate_checkpoints` was asked for: the test settings as given (None: the
    protocol's), the network options and the domains ``(name, dataset kind, root, split)``."""

    protocol: str | None = None
    mode: str | None = None
    crop: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    img_scale: tuple[int, int] | None = None
    num_classes: int = 19
    arch: str = "auto"
    prefix: str = "auto"
    domains: tuple[tuple[str, str, str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "mode": self.mode, "crop": _listed(self.crop),
                "stride": _listed(self.stride), "img_scale": _listed(self.img_scale),
                "num_classes": self.num_classes, "arch": self.arch, "prefix": self.prefix,
                "domains": {n: {"dataset": k, "root": r, "split": s} for n, k, r, s in self.domains}}


def _listed(pair: tuple[int, int] | None) -> list[int] | None:
    return None if pair is None else list(pair)


@dataclass(frozen=True)
class Intervals:
    """Bootstrap intervals over images of an :class:`Evaluation` (:meth:`Evaluation.intervals`):
    per row, every mIoU and H (``intervals``) and, after the first row (``reference``), its
    paired difference against it (``differences``)."""

    resamples: int
    level: float
    seed: int
    reference: str
    intervals: dict[str, dict[str, Interval]]
    differences: dict[str, dict[str, Interval]]

    def settings(self) -> dict[str, Any]:
        return {"resamples": self.resamples, "level": self.level, "seed": self.seed,
                "method": "percentile bootstrap over images", "reference": self.reference}


@dataclass
class Evaluation:
    """:func:`evaluate_checkpoints`' result.

    ``rows[row]``: :class:`RowScores` (``scores[row][domain]``: its :class:`SegScores`, with
    ``per_image`` when asked for); ``settings``: what was asked for; ``note``: how checkpoints
    were paired with domains; ``predictions``: the files and folders written under ``save_pred``
    (:meth:`remove_predictions` undoes them). :meth:`to_dict` is ``domainmerge evaluate --json``.
    """

    rows: dict[str, RowScores] = field(default_factory=dict)
    settings: EvaluationSettings = field(default_factory=EvaluationSettings)
    note: str = ""
    predictions: list[Path] = field(default_factory=list)

    @property
    def scores(self) -> dict[str, dict[str, SegScores]]:
        """``scores[row][domain]``."""
        return {r: dict(row.scores) for r, row in self.rows.items()}

    def intervals(self, *, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> Intervals:
        """Percentile bootstrap intervals over images (the evaluation must have kept ``per_image``
        counts), one set of resamples for every number
        (:func:`domainmerge.evaluation.bootstrap.compare`)."""
        from domainmerge.evaluation.bootstrap import compare

        stats = {r: {d: s.per_image for d, s in row.scores.items()} for r, row in self.rows.items()}
        if any(st is None for per in stats.values() for st in per.values()):
            raise ValueError("intervals need per-image counts: evaluate with per_image=True")
        ci = compare(stats, resamples=resamples, level=level, seed=seed)  # type: ignore[arg-type]
        return Intervals(resamples, level, seed, ci["reference"], ci["intervals"], ci["differences"])

    def to_dict(self, intervals: Intervals | None = None) -> dict[str, Any]:
        """JSON-ready ``{"settings", "results": {row: RowScores.to_dict()}}``, with the bootstrap
        ``intervals`` when given (``settings.ci``; per row ``ci`` and ``difference_vs_reference``)."""
        out: dict[str, Any] = {"settings": self.settings.to_dict(),
                               "results": {r: row.to_dict() for r, row in self.rows.items()}}
        if intervals is not None:
            out["settings"]["ci"] = intervals.settings()
            for r, per in intervals.intervals.items():
                out["results"][r]["ci"] = {k: v.to_dict() for k, v in per.items()}
            for r, per in intervals.differences.items():
                out["results"][r]["difference_vs_reference"] = {k: v.to_dict() for k, v in per.items()}
        return out

    def remove_predictions(self) -> None:
        """Remove the predictions written (files, then the folders made, deepest first)."""
        _remove_created(self.predictions)


def _remove_created(created: list[Path]) -> None:
    for path in reversed(created):
        with contextlib.suppress(OSError):
            path.rmdir() if path.is_dir() else path.unlink()


def _pair(value: Sequence[int] | None) -> tuple[int, int] | None:
    return None if value is None else (int(value[0]), int(value[1]))


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
        An :class:`Evaluation`: ``rows[row]`` (:class:`RowScores`), ``scores[row][domain]``,
        :meth:`Evaluation.to_dict` the JSON of ``domainmerge evaluate --json``.

    Example:
        >>> import os, tempfile, torch
        >>> from domainmerge import build_model, evaluate_checkpoints, save_checkpoint
        >>> _ = torch.manual_seed(0)
        >>> path = os.path.join(tempfile.mkdtemp(), "model.pth")
        >>> _ = save_checkpoint(path, build_model("tiny_daformer_r").state_dict())
        >>> from domainmerge.data import register_dataset
        >>> from domainmerge.data.synthetic import SyntheticDataset
        >>> register_dataset("small", lambda root, split, strict=True: SyntheticDataset(root, split, 4, size=(32, 64)),
        ...                  overwrite=True)   # a dataset kind for the example: 4 synthetic scenes of 32x64
        >>> result = evaluate_checkpoints([path], [("city", "small", "city", "val")])
        >>> list(result.scores), 0 <= result.scores["model"]["city"].miou <= 100
        (['model'], True)
        >>> result.to_dict()["results"]["model"]["domains"]["city"]["images"]
        4
    """
    from domainmerge.data import SegDataset, build_dataset
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
    datasets: dict[str, SegDataset] = {name: build_dataset(kind, root, split, strict=strict)
                                for name, kind, root, split in domains}
    kinds = {name: kind for name, kind, _, _ in domains}
    settings = EvaluationSettings(protocol, mode, _pair(crop), _pair(stride), _pair(img_scale), num_classes, arch,
                                  prefix, tuple((n, k, str(r), sp) for n, k, r, sp in domains))
    result = Evaluation(settings=settings, note=note)
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
            row = result.rows.setdefault(job.row, RowScores())
            row.checkpoints[job.domain] = job.ckpt
            row.arch[job.domain] = loaded[2]
            row.protocol[job.domain] = proto
            row.images[job.domain] = len(datasets[job.domain])
            row.scores[job.domain] = scores
    except BaseException:
        result.remove_predictions()  # no partial folder left
        raise
    return result
