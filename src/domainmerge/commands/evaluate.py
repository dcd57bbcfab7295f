"""`domainmerge evaluate`: score checkpoints on one or more domains (mIoU per domain, H)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domainmerge.commands._common import (
    add_domain_argument,
    add_inference_options,
    add_network_options,
    parse_domains,
    resolve_device,
    resolve_protocol,
)
from domainmerge.errors import UserError

DESCRIPTION = """\
Evaluate segmentation checkpoints (DAFormer, HRDA, MIC or domainmerge's own; architecture
detected from the keys) on each --domain and print mIoU per domain with the harmonic mean H.

Every checkpoint is scored on every domain, one table row per checkpoint. Checkpoints written
with separate heads (`merge --keep-heads ... --names cs idd` gives merged.cs.pth, merged.idd.pth)
are scored each on its own domain, as one row: this happens with --per-domain (pairing by the
name after the last dot when it names the domains, else by order) and automatically when the
file names end in exactly the domain names.

Test settings (--protocol): by default the authors' protocol for the checkpoint's network
family (HRDA, DAFormer, DeepLabV2) and each domain's dataset kind, e.g. HRDA on Cityscapes:
resize to fit 2048x1024, slide 1024x1024 windows, stride 512; DAFormer: whole images resized to
fit 1024x512. --protocol mtda takes Model-Merging-MTDA's multi-target test configs (IDD at
2048x1024 with 1024 windows); any of --mode/--crop/--stride/--img-scale means --protocol custom.
The settings are printed per domain before it runs and stored in the JSON. Images are resized as
uint8 like mmseg, then normalised; logits are resized to the label size before argmax.

--ci adds 95% bootstrap intervals over the val images (--resamples, --level): every mIoU and H,
and with several checkpoints the paired difference of each against the first (the same
resampled images for both), which tells a real gap from noise.

Runs data-parallel under torchrun (each rank scores a shard; confusion matrices are summed):
  torchrun --nproc_per_node 4 -m domainmerge evaluate CKPT --domain cs cityscapes data/cityscapes
"""


@dataclass(frozen=True)
class Job:
    """One (table row, checkpoint, domain) evaluation."""

    row: str
    ckpt: str
    domain: str


def _suffix(path: str) -> str:
    """'out/merged.cs.pth' -> 'cs' (the name `merge --keep-heads --names` puts before the suffix)."""
    stem = Path(path).stem
    return stem.rsplit(".", 1)[-1] if "." in stem else ""


def _row_names(ckpts: list[str]) -> list[str]:
    """Table row names: file stems, made unique with the parent folder when they clash."""
    stems = [Path(c).stem for c in ckpts]
    return [f"{Path(c).parent.name}/{s}" if stems.count(s) > 1 else s for c, s in zip(ckpts, stems)]


def plan_jobs(ckpts: list[str], domains: list[str], per_domain: bool) -> tuple[list[Job], str]:
    """The evaluations to run and a note on how checkpoints were paired with domains."""
    by_name = [_suffix(c) for c in ckpts]
    names_match = len(ckpts) == len(domains) and sorted(by_name) == sorted(domains)
    if per_domain or (names_match and len(ckpts) > 1):
        if len(ckpts) != len(domains):
            raise UserError(f"--per-domain needs one checkpoint per domain: got {len(ckpts)} checkpoints "
                            f"for {len(domains)} domains")
        pairs = dict(zip(by_name, ckpts)) if names_match else dict(zip(domains, ckpts))
        stem = Path(pairs[domains[0]]).stem
        base = stem.rsplit(".", 1)[0] if names_match else "per-domain"
        row = f"{base} (per-domain)"
        how = "by file name" if names_match else "by order"
        note = f"per-domain checkpoints, paired {how}: " + ", ".join(f"{d} <- {pairs[d]}" for d in domains)
        return [Job(row, pairs[d], d) for d in domains], note
    rows = _row_names(ckpts)
    return [Job(r, c, d) for r, c in zip(rows, ckpts) for d in domains], ""


def add_parser(subparsers: Any) -> None:
    """Register `evaluate`."""
    p = subparsers.add_parser("evaluate", help="evaluate checkpoints on domains (mIoU per domain, H)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="+", metavar="CKPT", help="checkpoint files (.pth/.pt/.bin/.safetensors)")
    add_domain_argument(p)
    p.add_argument("--per-domain", action="store_true",
                   help="score the i-th checkpoint on the i-th domain only (separate-head checkpoints)")
    add_network_options(p)
    add_inference_options(p)
    p.add_argument("--hr-crop", nargs=2, type=int, metavar=("H", "W"),
                   help="HRDA detail crop size (default 512 512, as HRDA trains)")
    p.add_argument("--json", metavar="OUT", help="also write the scores as JSON")
    p.add_argument("--save-pred", metavar="DIR", help="write predicted train-id PNGs under DIR/[ROW/]DOMAIN/")
    p.add_argument("--ci", action="store_true",
                   help="bootstrap confidence intervals over images for every mIoU, H and paired difference")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for --ci (default 1000)")
    p.add_argument("--level", type=float, default=0.95, help="interval level for --ci (default 0.95)")
    p.add_argument("--ci-seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="evaluate a checkpoint even when some of its tensors hold NaN or infinite values")
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes on stderr")
    p.set_defaults(func=run)


def _prediction_writer(folder: Path, created: list[Path]) -> Any:
    """A writer of predicted PNGs under ``folder``; files and folders it creates go to ``created``."""
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
        with atomic_path(target) as tmp:
            Image.fromarray(pred.numpy().astype(np.uint8), mode="L").save(tmp, format="PNG")
    return write


def _remove_created(created: list[Path]) -> None:
    """Undo a failed run's predictions: its files, then the folders it made (deepest first)."""
    import contextlib

    for path in reversed(created):
        with contextlib.suppress(OSError):
            path.rmdir() if path.is_dir() else path.unlink()


def _load_network(ckpt: str, args: argparse.Namespace, overrides: dict[str, Any]) -> tuple[Any, str, str]:
    """The network in ``ckpt`` (prefix stripped, architecture detected or forced), its
    description and its family (for the test protocol)."""
    from domainmerge.checkpoint import load_state_dict, strip_model_prefix
    from domainmerge.evaluation.protocols import family_of
    from domainmerge.merging import nonfinite_keys
    from domainmerge.models import model_from_state_dict, resolve_spec

    sd = strip_model_prefix(load_state_dict(ckpt, trust_pickle=args.trust_pickle), args.prefix)
    bad = nonfinite_keys(sd)
    if bad:
        message = (f"{ckpt}: {len(bad)} tensors hold NaN or infinite values (e.g. {bad[0]!r}); the checkpoint "
                   "is damaged or diverged")
        if not args.allow_nonfinite:
            raise UserError(f"{message}; pass --allow-nonfinite to evaluate it anyway")
        print(f"warning: {message}", file=sys.stderr)
    try:
        spec = resolve_spec(sd, args.arch, **overrides)
        return model_from_state_dict(sd, args.arch, **overrides), spec.describe(), family_of(spec)
    except UserError as exc:
        raise exc.prefixed(f"{ckpt}: ") from None


def _intervals(scores_of: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Bootstrap intervals of every row's scores (and differences against the first row); prints them."""
    from domainmerge import reporting
    from domainmerge.evaluation.bootstrap import compare

    stats = {r: {d: s.per_image for d, s in per.items()} for r, per in scores_of.items()}
    ci = compare(stats, resamples=args.resamples, level=args.level, seed=args.ci_seed)
    pct = f"{args.level * 100:g}%"
    print(f"\n{pct} bootstrap intervals over images ({args.resamples} resamples, percentile):")
    print(reporting.interval_table(ci["intervals"]))
    if ci["differences"]:
        print(f"\nPaired difference against {ci['reference']} (the same resampled images for both), "
              f"{pct} interval:")
        print(reporting.interval_table(ci["differences"], name=f"Model - {ci['reference']}", signed=True))
    return ci


def run(args: argparse.Namespace) -> int:
    """Evaluate every job, print the table on rank 0, write the requested files."""
    import torch

    from domainmerge import reporting
    from domainmerge.data import build_dataset
    from domainmerge.evaluation import distributed
    from domainmerge.evaluation.bootstrap import check_settings
    from domainmerge.evaluation.inference import evaluate_model
    from domainmerge.fsutil import check_output_dir, check_output_path

    domains = parse_domains(args.domain, "val")
    jobs, note = plan_jobs(list(args.ckpts), [d[0] for d in domains], args.per_domain)
    for c in args.ckpts:
        if not Path(c).is_file():
            raise UserError(f"{c}: checkpoint not found; check the path")
    # Every output is checked before any work: a late failure would waste the whole evaluation.
    if args.json:
        check_output_path(args.json, force=args.force, inputs=tuple(args.ckpts))
    if args.save_pred:
        check_output_dir(args.save_pred, option="--save-pred")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.ci:
        check_settings(args.resamples, args.level)
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers {args.workers}: must be 0 or more")

    started_here = not distributed.is_dist() and distributed.init_from_env()
    main = distributed.is_main_process()
    device = resolve_device(args.device)
    overrides = {"hr_crop_size": tuple(args.hr_crop)} if args.hr_crop else {}
    if note and main:
        print(note, file=sys.stderr)

    # Build every dataset first: a wrong path fails before any network is loaded.
    datasets: dict[str, Any] = {name: build_dataset(kind, root, split, strict=not args.no_strict)
                                for name, kind, root, split in domains}
    results: dict[str, dict[str, Any]] = {}  # row -> checkpoints, arch, per-domain scores (JSON)
    scores_of: dict[str, dict[str, Any]] = {}  # row -> domain -> SegScores
    kinds = {name: kind for name, kind, _, _ in domains}
    loaded: tuple[str, Any, str, str] | None = None
    created: list[Path] = []  # predictions of this run, removed if it fails: no partial folder left
    try:
        for job in jobs:
            if loaded is None or loaded[0] != job.ckpt:
                loaded = None  # free the previous network before loading the next
                model, desc, family = _load_network(job.ckpt, args, overrides)
                loaded = (job.ckpt, model, desc, family)
                if main and not args.quiet:
                    print(f"{job.ckpt}: {desc}", file=sys.stderr)
            proto = resolve_protocol(args, loaded[3], kinds[job.domain])
            if main and not args.quiet:
                print(f"{job.row} | {job.domain}: {proto.describe()}", file=sys.stderr)
            save = None
            if args.save_pred:
                sub = Path(args.save_pred) / (job.row if len({j.row for j in jobs}) > 1 else "") / job.domain
                save = _prediction_writer(sub, created)
            scores = evaluate_model(
                loaded[1], datasets[job.domain], mode=proto.mode, crop=proto.crop or (1024, 1024),
                stride=proto.stride or (512, 512), device=device, batch_size=args.batch_size,
                num_classes=args.num_classes, img_scale=proto.img_scale, amp=args.amp,
                workers=args.workers, progress=not args.quiet, desc=f"{job.row} | {job.domain}",
                on_prediction=save, per_image=args.ci, max_windows=args.max_windows)
            row = results.setdefault(job.row, {"checkpoints": {}, "arch": {}, "protocol": {}, "domains": {}})
            row["checkpoints"][job.domain] = job.ckpt
            row["arch"][job.domain] = loaded[2]
            row["protocol"][job.domain] = proto.to_dict()
            row["domains"][job.domain] = {"images": len(datasets[job.domain]), **scores.to_dict()}
            scores_of.setdefault(job.row, {})[job.domain] = scores
    except BaseException:
        _remove_created(created)
        raise
    finally:
        if started_here:
            torch.distributed.destroy_process_group()

    if not main:
        return 0
    mious = {r: {d: s.miou for d, s in per.items()} for r, per in scores_of.items()}
    if len(scores_of) == 1:
        print(reporting.class_table(next(iter(scores_of.values()))))
        print()
    print(reporting.domain_table(mious, domains=[d[0] for d in domains]))
    ci = _intervals(scores_of, args) if args.ci else None
    if args.json:
        out = {
            "settings": {"protocol": args.protocol, "mode": args.mode, "crop": args.crop, "stride": args.stride,
                         "img_scale": args.img_scale,
                         "num_classes": args.num_classes, "arch": args.arch, "prefix": args.prefix,
                         "domains": {n: {"dataset": k, "root": r, "split": s} for n, k, r, s in domains}},
            "results": {r: {**res,
                            **(reporting.summarize(mious[r]) if len(mious[r]) > 1 else {})}
                        for r, res in results.items()},
        }
        if ci is not None:
            out["settings"]["ci"] = {"resamples": args.resamples, "level": args.level, "seed": args.ci_seed,
                                     "method": "percentile bootstrap over images", "reference": ci["reference"]}
            for r, per in ci["intervals"].items():
                out["results"][r]["ci"] = {k: v.to_dict() for k, v in per.items()}
            for r, per in ci["differences"].items():
                out["results"][r]["difference_vs_reference"] = {k: v.to_dict() for k, v in per.items()}
        try:
            reporting.write_json(args.json, out, replace=args.force)
        except BaseException:
            _remove_created(created)  # all outputs or none
            raise
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
