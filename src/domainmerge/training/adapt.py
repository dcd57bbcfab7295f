"""Single-target domain adaptation by self-training (phase 1 of the method): :func:`adapt`.

One iteration (DAFormer's ``DACS.forward_train``, with HRDA and MIC when the recipe says so):

1. source batch: cross-entropy (HRDA: fused + 0.1 x detail) plus, when lambda > 0, the thing-class
   feature distance to the frozen ImageNet copy, one backward;
2. target batch: the EMA teacher (BatchNorm in training mode, dropout off) predicts pseudo-labels
   (HRDA: fused sliding-window prediction) weighted by the confident share of the global batch;
3. ClassMix pastes half of each source image's classes onto the target image of the same slot;
   colour jitter and blur; cross-entropy against the mixed labels and weights, one backward;
4. MIC: the target image, jittered and blurred separately and block-masked, against the same
   pseudo-labels and weights, one backward;
5. AdamW step with the schedule's rate; the teacher takes the EMA of the student with the rate of
   the next iteration (DAFormer updates it at the start of the next iteration).

Determinism: every random draw is a pure function of (seed, iteration, global sample slot):
data (:mod:`domainmerge.data.training`), ClassMix, jitter, blur, MIC masks and HRDA boxes
(:func:`~domainmerge.training.augment.sample_generator`); dropout uses torch's global generator
re-seeded from (seed, iteration, rank) every iteration. Resuming therefore needs only the
weights and the optimiser state, and under torchrun the global batch (ranks x batch size) sees
the samples a single process with that batch would; batch-level quantities (pseudo-label share,
feature-distance mask size, BatchNorm statistics) are summed over ranks.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from domainmerge.data.classes import CLASSES, NUM_CLASSES, PALETTE
from domainmerge.errors import UserError
from domainmerge.evaluation import distributed
from domainmerge.evaluation.inference import autocast, normalize
from domainmerge.training.augment import classmix_mask, sample_generator, strong_transform
from domainmerge.training.ema import ema_update, frozen_copy
from domainmerge.training.hrda import crop_to, detail_box, train_forward
from domainmerge.training.mic import block_mask
from domainmerge.training.recipe import Recipe
from domainmerge.training.schedule import build_optimizer, set_lr
from domainmerge.training.selftrain import feature_distance, pseudo_labels, pseudo_weight, resized_logits, weighted_ce

LATEST = "latest.pth"
LOG = "log.jsonl"
LOSSES = ("source", "fd", "pseudo", "mic")


@dataclass
class AdaptConfig:
    """One run. ``source``/``target``/``val``: ``(kind, root, split)`` for ``build_dataset`` or an
    already-built reader. ``target=None`` trains on the labelled source only (no teacher).
    ``pretrained``: backbone weights (SegFormer/HF MiT, mmseg ResNetV1c); ``init_state``: a
    full state dict to start from instead. The frozen ImageNet copy of the feature distance is
    the network as initialised. ``source_crop``/``target_crop`` default to the recipe's.
    ``batch_size``/``iters`` live in the recipe (batch per process)."""

    source: Any
    target: Any | None = None
    out: str | Path | None = None
    arch: str = "daformer_mitb5"
    arch_options: dict[str, Any] = field(default_factory=dict)
    pretrained: str | Path | None = None
    trust_pickle: bool = False
    init_state: Mapping[str, Tensor] | None = None
    recipe: Recipe = field(default_factory=Recipe)
    source_crop: Any | None = None          # domainmerge.data.training.CropConfig
    target_crop: Any | None = None
    val: Any | None = None
    val_every: int = 4000                   # DAFormer: evaluation interval 4000
    val_mode: str | None = None             # None: 'slide' (1024, stride 512) for HRDA, else 'whole'
    save_every: int = 5000                  # Model-Merging-MTDA: checkpoint interval 5000
    log_every: int = 50                     # mmcv's default logger interval
    amp: str | None = None                  # None, 'bf16' or 'fp16'
    seed: int = 0
    workers: int = 0
    device: str = "cpu"
    resume: bool = False
    force: bool = False
    stop_at: int | None = None              # stop (and save) after this iteration; the schedule keeps ``iters``
    progress: bool = True
    desc: str = "adapt"


@dataclass
class AdaptResult:
    """The trained networks (student: the model that gets merged), per-iteration records and
    validation scores, and the last checkpoint written (None without ``out``)."""

    student: dict[str, Tensor]
    teacher: dict[str, Tensor] | None
    records: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    iterations: int
    checkpoint: Path | None


class Student(nn.Module):
    """The training forward of a segmentor (what DistributedDataParallel wraps): returns
    (logits, HRDA detail logits or None, backbone features of the view the feature distance uses)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, boxes: list[tuple[int, int, int, int]] | None = None
                ) -> tuple[Tensor, Tensor | None, list[Tensor]]:
        if boxes is not None:
            return train_forward(self.model, x, boxes)  # type: ignore[arg-type]
        backbone, head = cast(nn.Module, self.model.backbone), cast(nn.Module, self.model.decode_head)
        feats = backbone(x)
        return head(feats), None, feats


def _reader(spec: Any, what: str) -> Any:
    if isinstance(spec, (tuple, list)):
        from domainmerge.data.readers import build_dataset

        if len(spec) != 3:
            raise UserError(f"{what}: give KIND ROOT SPLIT, got {' '.join(map(str, spec))}")
        return build_dataset(str(spec[0]), spec[1], str(spec[2]))
    return spec


def _check_out(config: AdaptConfig) -> Path | None:
    """The output folder: refused when it holds a run unless resuming (needs latest.pth) or forced."""
    if config.out is None:
        if config.resume:
            raise UserError("--resume needs --out, the folder of the run to continue")
        return None
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --out")
    has_run = (out / LATEST).exists() or (out / LOG).exists()
    if config.resume:
        if not (out / LATEST).exists():
            raise UserError(f"{out}: holds no {LATEST} to resume; drop --resume to start a new run")
    elif has_run and not config.force:
        raise UserError(f"{out}: holds a training run; pass --resume to continue it or --force to start over")
    if distributed.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        if has_run and config.force and not config.resume:
            for old in [out / LATEST, out / LOG, *out.glob("iter_*.pth")]:
                old.unlink(missing_ok=True)
    return out


def _save(path: Path, payload: dict[str, Any]) -> None:
    from domainmerge.fsutil import atomic_path

    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _dropout_off(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()


def adapt(config: AdaptConfig, *, log: Callable[[str], None] = print) -> AdaptResult:
    """Train ``config.arch`` on the labelled source and (self-training) the unlabelled target.

    Writes ``OUT/latest.pth`` every ``log_every``/``save_every`` boundary and at the end,
    ``OUT/iter_N.pth`` every ``save_every`` iterations and at the end, and ``OUT/log.jsonl``
    (losses, pseudo-label weight, learning rate, images/s, validation mIoU). Checkpoints are the
    authors' container: ``{'meta': {'iter', 'CLASSES', 'PALETTE', 'domainmerge'}, 'state_dict':
    {'model.*', 'ema_model.*', 'imnet_model.*'}, 'optimizer': ...}``.
    """
    from domainmerge.data.rcs import RareClassSampler
    from domainmerge.data.training import CropConfig, TrainSet, batches
    from domainmerge.models import build_model

    r = config.recipe
    if r.iters < 1 or r.batch_size < 1:
        raise UserError(f"iterations ({r.iters}) and batch size ({r.batch_size}) must be at least 1")
    uda = r.uda and config.target is not None
    out = _check_out(config)
    device = torch.device(config.device)
    amp = None if config.amp in (None, "none") else config.amp
    autocast(device, amp)   # validates the combination before any work
    dist_on = distributed.init_from_env()
    rank, world = distributed.get_rank(), distributed.get_world_size()

    # -- data
    source_reader = _reader(config.source, "--source")
    source_crop = config.source_crop or CropConfig(r.source_scale, r.crop, r.cat_max_ratio, r.flip)
    target_crop = config.target_crop or CropConfig(r.target_scale, r.crop, r.cat_max_ratio, r.flip)
    rcs = RareClassSampler.from_dataset(source_reader, temperature=r.rcs_temperature, min_pixels=r.rcs_min_pixels,
                                        min_crop_ratio=r.rcs_min_crop_ratio) if r.rcs else None
    source_set = TrainSet(source_reader, source_crop, seed=config.seed, labeled=True, rcs=rcs)
    target_set = TrainSet(_reader(config.target, "--target"), target_crop, seed=config.seed + 1,
                          labeled=False) if uda else None
    val_reader = _reader(config.val, "--val") if config.val is not None else None

    # -- networks
    torch.manual_seed(config.seed)
    model = build_model(config.arch, num_classes=NUM_CLASSES, **config.arch_options)
    is_hrda = hasattr(model, "hr_crop_size")
    if r.hrda and not is_hrda:
        raise UserError(f"--recipe hrda needs an HRDA architecture (hrda_*), got {config.arch}")
    if config.init_state is not None:
        model.load_state_dict(config.init_state)
    elif config.pretrained is not None:
        from domainmerge.models.pretrained import load_pretrained

        log(load_pretrained(model, config.pretrained, trust_pickle=config.trust_pickle))
    model.to(device)
    use_fd = uda and r.fd_lambda > 0
    imnet = frozen_copy(model).eval() if use_fd else None
    teacher = frozen_copy(model) if uda else None

    start = 0
    opt_state = None
    if config.resume and out is not None:
        ck = torch.load(out / LATEST, map_location="cpu", weights_only=True)
        meta = ck.get("meta", {}).get("domainmerge", {})
        if meta.get("arch") != config.arch:
            raise UserError(f"{out / LATEST}: a run of {meta.get('arch')!r}, not --arch {config.arch}")
        sd = ck["state_dict"]
        for prefix, net in (("model.", model), ("ema_model.", teacher), ("imnet_model.", imnet)):
            if net is not None:
                net.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
        start, opt_state = int(ck["meta"]["iter"]), ck.get("optimizer")
        log(f"resuming {out / LATEST} at iteration {start}")
    if dist_on and world > 1:
        from domainmerge.training.syncbn import sync_batchnorm

        model = sync_batchnorm(model, device)
        teacher = sync_batchnorm(teacher, device) if teacher is not None else None
    student: nn.Module = Student(model)
    optimizer = build_optimizer(model, r)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    if dist_on and world > 1:
        student = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16" and device.type == "cuda")
    model.train()
    if teacher is not None:
        teacher.train()
        _dropout_off(teacher)

    # -- the loop
    b = r.batch_size
    src_iter = batches(source_set, b, start_iter=start, rank=rank, world_size=world, workers=config.workers)
    tgt_iter = batches(target_set, b, start_iter=start, rank=rank, world_size=world,
                       workers=config.workers) if target_set is not None else None
    records: list[dict[str, Any]] = []
    validation: list[dict[str, Any]] = []
    main = distributed.is_main_process()
    from tqdm import tqdm

    bar = tqdm(total=r.iters, initial=start, desc=config.desc, disable=not (config.progress and main),
               dynamic_ncols=True, mininterval=1.0, leave=False)
    crop_hw = None
    last_saved: Path | None = (out / LATEST) if (out is not None and start > 0) else None
    log_fh = open(out / LOG, "a", encoding="utf-8") if (out is not None and main) else None
    t_last = time.perf_counter()
    try:
        end = r.iters if config.stop_at is None else min(config.stop_at, r.iters)
        for it in range(start, end):
            torch.manual_seed(int(sample_generator(config.seed, it, rank, "dropout").initial_seed()))
            lr = set_lr(optimizer, it, r)
            slots = [rank * b + j for j in range(b)]
            src = next(src_iter)
            xs, ys = src["image"].to(device), src["label"].to(device)
            crop_hw = tuple(xs.shape[-2:])
            boxes = _boxes(is_hrda, model, crop_hw, r, config.seed, it, slots, "hrda_source")
            losses: dict[str, Tensor] = {}
            optimizer.zero_grad(set_to_none=True)

            with autocast(device, amp):
                logits, detail, feats = student(normalize(xs), boxes)
            loss = _seg_loss(logits, detail, ys, None, boxes, r)
            losses["source"] = loss.detach()
            if use_fd:
                assert imnet is not None
                with torch.no_grad():
                    view = normalize(xs)
                    if is_hrda:
                        view = torch.nn.functional.interpolate(view, scale_factor=model.lr_scale,  # type: ignore
                                                               mode="bilinear", align_corners=False)
                    ref = cast(nn.Module, imnet.backbone)(view)[-1]
                dsum, count = feature_distance(feats[-1], ref, ys, r.fd_classes, r.fd_min_ratio, NUM_CLASSES)
                total = float(distributed.all_reduce_sum(count.reshape(1).cpu())[0])
                # mean over the global mask; x world size because DDP averages the ranks' gradients
                fd = r.fd_lambda * dsum * (world / total) if total > 0 else dsum * 0.0
                losses["fd"] = fd.detach()
                loss = loss + fd
            scaler.scale(loss).backward()

            share = float("nan")
            if uda:
                assert teacher is not None and tgt_iter is not None
                xt = next(tgt_iter)["image"].to(device)
                with torch.no_grad(), autocast(device, amp):
                    t_logits = resized_logits(teacher(normalize(xt)).float(), xt.shape[-2:])
                plabel, confident = pseudo_labels(t_logits, r.pseudo_threshold)
                pweight, share = pseudo_weight(confident, plabel, r.ignore_top, r.ignore_bottom)
                mixed, mlabel, mweight = [], [], []
                for j, slot in enumerate(slots):
                    mask = classmix_mask(ys[j:j + 1].cpu(), sample_generator(config.seed, it, slot, "classmix"))[0]
                    mask = mask.to(device)
                    img = torch.where(mask, xs[j].float(), xt[j].float())
                    mixed.append(strong_transform(img.cpu(), sample_generator(config.seed, it, slot, "jitter_mix"),
                                                  jitter_strength=r.jitter_strength, jitter_p=r.jitter_p,
                                                  blur=r.blur).to(device))
                    mlabel.append(torch.where(mask, ys[j], plabel[j]))
                    mweight.append(torch.where(mask, torch.ones_like(pweight[j]), pweight[j]))
                mboxes = _boxes(is_hrda, model, crop_hw, r, config.seed, it, slots, "hrda_mix")
                with autocast(device, amp):
                    m_logits, m_detail, _ = student(normalize(torch.stack(mixed)), mboxes)
                loss_mix = _seg_loss(m_logits, m_detail, torch.stack(mlabel), torch.stack(mweight), mboxes, r)
                losses["pseudo"] = loss_mix.detach()
                scaler.scale(loss_mix).backward()
                if r.mic:
                    masked = []
                    for j, slot in enumerate(slots):
                        g = sample_generator(config.seed, it, slot, "jitter_mic")
                        img = strong_transform(xt[j].float().cpu(), g, jitter_strength=r.jitter_strength,
                                               jitter_p=r.jitter_p, blur=r.blur)
                        keep = block_mask(img.shape[-2], img.shape[-1], r.mask_block_size, r.mask_ratio,
                                          sample_generator(config.seed, it, slot, "mic_mask"))
                        masked.append((img * keep).to(device))
                    kboxes = _boxes(is_hrda, model, crop_hw, r, config.seed, it, slots, "hrda_mic")
                    with autocast(device, amp):
                        k_logits, k_detail, _ = student(normalize(torch.stack(masked)), kboxes)
                    loss_mic = r.mic_lambda * _seg_loss(k_logits, k_detail, plabel, pweight, kboxes, r)
                    losses["mic"] = loss_mic.detach()
                    scaler.scale(loss_mic).backward()

            # Losses averaged over ranks (one collective), also the NaN check every rank agrees on.
            names = [k for k in LOSSES if k in losses]
            values = distributed.all_reduce_sum(torch.stack([losses[k].float().cpu() for k in names])) / world
            if not bool(torch.isfinite(values).all()):
                bad = names[int((~torch.isfinite(values)).nonzero()[0])]
                kept = f"; {last_saved} stays" if last_saved is not None else ""
                raise UserError(f"iteration {it + 1}: the {bad} loss is {float(values[names.index(bad)])}; "
                                f"training stopped{kept} (lower the learning rate or check the data)")
            scaler.step(optimizer)
            scaler.update()
            if teacher is not None:
                ema_update(teacher, model, r.alpha, it + 1)

            now = time.perf_counter()
            images = (2 if uda else 1) * b * world
            record: dict[str, Any] = {"iter": it + 1, "lr": lr,
                                      **{f"loss_{k}": float(v) for k, v in zip(names, values)},
                                      "images_per_s": images / max(now - t_last, 1e-9)}
            if uda:
                record["pseudo_weight"] = share
            t_last = now
            records.append(record)
            bar.update(1)
            n = it + 1
            if log_fh is not None and (n % config.log_every == 0 or n == end):
                log_fh.write(json.dumps(record) + "\n")
                log_fh.flush()
                bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k.startswith("loss_")})
            if val_reader is not None and config.val_every > 0 and (n % config.val_every == 0 or n == r.iters):
                validation.append(_validate(model, val_reader, config, is_hrda, n, log, log_fh))
            if out is not None and (n % config.save_every == 0 or n == end):
                last_saved = _checkpoint(out, n, model, teacher, imnet, optimizer, config, crop_hw, world,
                                         keep=True) or last_saved
    finally:
        bar.close()
        if log_fh is not None:
            log_fh.close()
    return AdaptResult(student={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                       teacher=None if teacher is None else {k: v.detach().cpu().clone()
                                                            for k, v in teacher.state_dict().items()},
                       records=records, validation=validation, iterations=end, checkpoint=last_saved)


def _boxes(is_hrda: bool, model: nn.Module, size: tuple[int, ...], r: Recipe, seed: int, it: int, slots: list[int],
           stream: str) -> list[tuple[int, int, int, int]] | None:
    if not is_hrda:
        return None
    hr_crop = cast(tuple[int, int], model.hr_crop_size)
    crop = (min(hr_crop[0], size[0]), min(hr_crop[1], size[1]))
    return [detail_box(size[0], size[1], crop, r.crop_divisible, sample_generator(seed, it, slot, stream))
            for slot in slots]


def _seg_loss(logits: Tensor, detail: Tensor | None, labels: Tensor, weight: Tensor | None,
              boxes: list[tuple[int, int, int, int]] | None, r: Recipe) -> Tensor:
    loss = weighted_ce(logits, labels, weight)
    if detail is not None and boxes is not None and r.detail_loss_weight > 0:
        loss = loss + r.detail_loss_weight * weighted_ce(detail, crop_to(labels, boxes),
                                                         None if weight is None else crop_to(weight, boxes))
    return loss


def _validate(model: nn.Module, reader: Any, config: AdaptConfig, is_hrda: bool, n: int,
              log: Callable[[str], None], log_fh: Any) -> dict[str, Any]:
    from domainmerge.evaluation.inference import evaluate_model

    mode = config.val_mode or ("slide" if is_hrda else "whole")
    scores = evaluate_model(model, reader, mode=mode, device=config.device, progress=False, amp=config.amp
                            if config.amp not in (None, "none") else None, desc="val")
    model.train()
    entry = {"iter": n, "val": scores.to_dict()}
    if distributed.is_main_process():
        from domainmerge.reporting import class_table

        log(f"iteration {n}: validation mIoU {scores.miou:.2f}\n{class_table({'val': scores})}")
        if log_fh is not None:
            log_fh.write(json.dumps({"iter": n, "val_miou": scores.miou}) + "\n")
    return entry


def _checkpoint(out: Path, n: int, model: nn.Module, teacher: nn.Module | None, imnet: nn.Module | None,
                optimizer: torch.optim.Optimizer, config: AdaptConfig, crop: Any, world: int,
                keep: bool) -> Path | None:
    """Rank 0 writes ``latest.pth`` atomically and hard-links it as ``iter_N.pth``."""
    if not distributed.is_main_process():
        return None
    sd: dict[str, Tensor] = {}
    for prefix, net in (("model.", model), ("ema_model.", teacher), ("imnet_model.", imnet)):
        if net is not None:
            sd.update({prefix + k: v.detach().cpu() for k, v in net.state_dict().items()})
    record = {"arch": config.arch, "recipe": asdict(config.recipe), "seed": config.seed, "world_size": world,
              "batch_size": config.recipe.batch_size, "crop": list(crop) if crop else None,
              "source": _describe(config.source), "target": _describe(config.target)}
    payload = {"meta": {"iter": n, "CLASSES": list(CLASSES), "PALETTE": [list(p) for p in PALETTE],
                        "domainmerge": record},
               "state_dict": sd, "optimizer": optimizer.state_dict()}
    latest = out / LATEST
    _save(latest, payload)
    if keep:
        tmp = out / f".iter_{n}.pth.link"
        tmp.unlink(missing_ok=True)
        os.link(latest, tmp)
        os.replace(tmp, out / f"iter_{n}.pth")
    return latest


def _describe(spec: Any) -> str | None:
    if spec is None:
        return None
    if isinstance(spec, (tuple, list)):
        return " ".join(map(str, spec))
    return type(spec).__name__


__all__ = ["AdaptConfig", "AdaptResult", "Student", "adapt"]
