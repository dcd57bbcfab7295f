"""Single-target domain adaptation by self-training (phase 1 of the method): :func:`adapt`.

One iteration (DAFormer's ``DACS.forward_train``, with HRDA and MIC when the recipe says so):

1. source batch: cross-entropy (HRDA: 0.9 x fused + 0.1 x detail) plus, when lambda > 0, the
   thing-class feature distance to the frozen ImageNet copy, one backward;
2. target batch: the EMA teacher (BatchNorm in training mode, dropout and stochastic depth off)
   predicts pseudo-labels (HRDA: fused sliding-window prediction) weighted by the confident share
   of the global batch;
3. ClassMix pastes, per slot, half of the global batch's source label values onto the target
   image; colour jitter (80 % of iterations) and blur (50 %) of the mixed images
   (:mod:`~domainmerge.training.augment`); cross-entropy against the mixed labels and weights,
   one backward;
4. MIC: the target batch, jittered and blurred separately, normalised and block-masked, against
   the same pseudo-labels and weights, one backward;
5. AdamW step with the schedule's rate; the teacher takes the EMA of the student with the rate of
   the next iteration (DAFormer updates it at the start of the next iteration).

Determinism: every random draw is a pure function of (seed, iteration, global sample slot):
data (:mod:`domainmerge.data.training`), ClassMix, jitter, blur, MIC masks, HRDA boxes and MiT's
stochastic depth (:func:`~domainmerge.training.augment.sample_generator`); dropout uses torch's global generator
re-seeded from (seed, iteration, rank) every iteration. Resuming therefore needs only the
weights and the optimiser state, and under torchrun the global batch (ranks x batch size) sees
the samples a single process with that batch would; batch-level quantities (pseudo-label share,
feature-distance mask size, BatchNorm statistics) are summed over ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from domainmerge.checkpoint import DA_TRAINING
from domainmerge.data.classes import CLASSES, NUM_CLASSES, PALETTE
from domainmerge.errors import DamagedCheckpoint, Option, UserError, loader_errors
from domainmerge.models.hrda import backbone_views
from domainmerge.models.mit import DropPath
from domainmerge.runtime import distributed
from domainmerge.runtime.precision import AMP_DTYPES, autocast, cast_once
from domainmerge.tensors import normalize
from domainmerge.training.augment import SHARED, classmix_masks, drop_path_noise, mix, sample_generator, strong_augment
from domainmerge.training.ema import ema_update, frozen_copy
from domainmerge.training.hrda import crop_to, detail_box, hrda_loss, train_forward
from domainmerge.training.mic import block_masks, mask_image
from domainmerge.training.recipe import Recipe
from domainmerge.training.runfolder import LATEST, RunFolder
from domainmerge.training.schedule import build_optimizer, set_lr
from domainmerge.training.selftrain import feature_distance, pseudo_labels, pseudo_weight, resized_logits, weighted_ce
from domainmerge.training.shadows import CastShadow, GradShadow

LOSSES = ("source", "fd", "pseudo", "mic")


@dataclass
class AdaptConfig:
    """One run. ``source``/``target``/``val``: ``(kind, root, split)`` for ``build_dataset`` or an
    already-built reader. ``target=None`` trains on the labelled source only (no teacher).
    ``pretrained``: backbone weights (SegFormer/HF MiT, mmseg ResNetV1c); ``init_state``: a
    full state dict to start from instead. The frozen ImageNet copy of the feature distance is
    the network as initialised. ``source_crop``/``target_crop`` default to the recipe's
    (``crop_size`` replaces its crop size); a crop larger than the (resized) images is capped
    to them, and the log says so. ``batch_size``/``iters`` live in the recipe (batch per process)."""

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
    crop_size: tuple[int, int] | None = None   # (h, w) for both domains instead of the recipe's crop
    val: Any | None = None
    val_every: int = 4000                   # DAFormer: evaluation interval 4000
    val_mode: str | None = None             # None: 'slide' (1024, stride 512) for HRDA, else 'whole'
    save_every: int = 5000                  # Model-Merging-MTDA: checkpoint interval 5000
    log_every: int = 50                     # mmcv's default logger interval
    amp: str | None = None                  # None, 'bf16' or 'fp16'
    seed: int = 0
    workers: int | None = 0                 # None: 0 for in-memory datasets (synthetic), else 2
    device: str = "cpu"
    compile: bool | str = False             # torch.compile the backbones and heads: True or a mode of COMPILE_MODES
    compile_blocks: bool = False            # compile the backbones block by block (implies compile; see compile_parts)
    one_pass: bool = False                  # the student's views in one forward and one backward (see Trainer.step)
    channels_last: bool = False             # NHWC convolutions on CUDA (cuDNN's faster layout for ResNets)
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

    def __init__(self, model: nn.Module, channels_last: bool = False) -> None:
        super().__init__()
        self.model = model
        self.channels_last = channels_last   # inputs in the NHWC layout of the convolutions' weights

    def forward(self, views: list[Tensor], boxes: list[list[tuple[int, int, int, int]]] | None = None
                ) -> list[tuple[Tensor, Tensor | None, list[Tensor]]]:
        """One triple per view (a forward's batch; several with ``AdaptConfig.one_pass``, whose
        backbone passes go together where :func:`~domainmerge.models.hrda.backbone_views` can
        stack them; the heads run per view). ``boxes``: HRDA's detail boxes per view."""
        if self.channels_last:
            views = [x.contiguous(memory_format=torch.channels_last) for x in views]
        if boxes is not None:
            return list(train_forward(self.model, views, boxes))  # type: ignore[arg-type]
        head = cast(nn.Module, self.model.decode_head)
        return [(head(feats), None, feats) for feats in backbone_views(cast(nn.Module, self.model.backbone), views)]


# torch.compile modes: 'default' fuses operators (fewer kernel launches); 'reduce-overhead' also
# replays each compiled part as a CUDA graph (one launch per part; CPU: as 'default');
# 'max-autotune' also benchmarks kernel choices (a longer compile)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKEND = "inductor"   # the tests swap in 'aot_eager' (the same graphs, no code generation)
# Compiled variants allowed per forward function. The student, the teacher, the ImageNet copy and
# validation run the same forward code with other grad modes, train/eval flags, parameter dtypes
# (the cast shadows) and input shapes (HRDA's context, detail crops and slide windows): each is a
# variant, compiled once. Past torch's default of 8, dynamo would silently run the rest eagerly.
COMPILE_VARIANTS = 64


def compile_mode(value: bool | str | None) -> str | None:
    """The torch.compile mode of an ``AdaptConfig.compile`` value (True: 'default'; False/None:
    no compile); another value is a UserError naming the modes."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if value not in COMPILE_MODES:
        raise UserError(Option("compile", value), f": use one of {', '.join(COMPILE_MODES)}")
    return str(value)


def compile_parts(model: nn.Module, mode: str = "default", blocks: bool = False) -> None:
    """``torch.compile`` (in place, state-dict keys unchanged) the backbone and the head(s) of a
    segmentor: the parts whose input shapes are fixed during training. The HRDA glue (boxes drawn
    per iteration) stays eager, since compiling it would recompile for every box.

    ``blocks``: the backbone block by block instead of whole (regional compilation: MiT's patch
    embeddings and transformer blocks, ResNet's stem and bottlenecks; the loop between them stays
    eager). The blocks of a stage share one graph, their weights being its inputs, so the compile
    time does not grow with the depth (MiT-B5, one training variant, inductor on 2 CPU cores: 57 s
    instead of 208 s), for a call of a compiled block per block and pass instead of one per backbone."""
    from domainmerge.models.mit import Block, OverlapPatchEmbed
    from domainmerge.models.resnet import Bottleneck

    backbone = cast(nn.Module, model.backbone)
    parts: list[nn.Module]
    if blocks:
        parts = [m for m in backbone.modules() if isinstance(m, (Block, OverlapPatchEmbed, Bottleneck))]
        parts += [cast(nn.Module, backbone.stem)] if hasattr(backbone, "stem") else []
    else:
        parts = [backbone]
    head = cast(nn.Module, model.decode_head)
    parts += [cast(nn.Module, head.head), cast(nn.Module, head.scale_attention)] if hasattr(head, "scale_attention") \
        else [head]
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_VARIANTS)
    for part in parts:
        part.compile(dynamic=False, backend=COMPILE_BACKEND, mode=None if mode == "default" else mode)


def _reader(spec: Any, option: str, *, images_only: bool = False) -> Any:
    if isinstance(spec, (tuple, list)):
        from domainmerge.data.readers import build_dataset, image_dataset

        if len(spec) != 3:
            raise UserError(Option(option, " ".join(map(str, spec))), ": give KIND ROOT SPLIT")
        return (image_dataset if images_only else build_dataset)(str(spec[0]), spec[1], str(spec[2]))
    return spec


def _fit_crop(reader: Any, crop: Any, what: str, log: Callable[[str], None]) -> Any:
    """``crop`` (a CropConfig) with its crop size capped to the reader's (resized) images, judged
    by the first image: a crop larger than the image would only add padding."""
    from domainmerge.data.training import TrainSet
    from domainmerge.data.transforms import rescale_size

    if crop.crop is None:
        return crop
    height, width = TrainSet(reader, crop, seed=0, labeled=False).load(0)[0].shape[-2:]
    if crop.scale is not None:
        width, height = rescale_size(int(width), int(height), crop.scale)
    h, w = int(height), int(width)
    if crop.crop[0] <= h and crop.crop[1] <= w:
        return crop
    capped = (min(crop.crop[0], h), min(crop.crop[1], w))
    log(f"{what} crop {crop.crop[0]}x{crop.crop[1]} is larger than its images ({h}x{w}): "
        f"cropping {capped[0]}x{capped[1]}")
    return dataclasses.replace(crop, crop=capped)


def _check_val(reader: Any) -> None:
    """Read one sample of the validation set now, not at the first validation hours later."""
    if len(reader) == 0:
        raise UserError(Option("val"), ": the validation set is empty")
    reader[0]


def _read_checkpoint(path: Path, arch: str, iters: int) -> Any:
    """``latest.pth`` of the run to resume, opened (domainmerge.checkpoint's reader: damaged files
    are one-line errors) with its meta checked."""
    from domainmerge.checkpoint import open_checkpoint

    try:
        ck = open_checkpoint(path)
    except DamagedCheckpoint as exc:   # the run's own file: the advice is the run's other checkpoints
        raise DamagedCheckpoint(path, exc.what, fix=(
            "copy the run's last intact iter_N.pth over it to resume from there, or start over with ",
            Option("force", switch=True))) from None
    meta = ck.extras.get("meta")
    fix = ("; the checkpoint is not one adapt wrote, or is damaged: drop ", Option("resume", switch=True),
           " to start over")
    if not isinstance(meta, dict) or not isinstance(meta.get("domainmerge"), dict):
        raise UserError(f"{path}: no meta.domainmerge record", *fix)
    it = meta.get("iter")
    if not isinstance(it, int) or isinstance(it, bool) or not 0 <= it <= iters:
        raise UserError(f"{path}: meta.iter is {it!r}, not an iteration of this run (0..{iters})", *fix)
    if meta["domainmerge"].get("arch") != arch:
        raise UserError(f"{path}: a run of {meta['domainmerge'].get('arch')!r}, not ", Option("arch", arch))
    if not isinstance(ck.extras.get("optimizer"), dict):
        raise UserError(f"{path}: holds no optimizer state", *fix)
    return ck


def _load_optimizer(optimizer: torch.optim.Optimizer, state: Any, path: Path) -> None:
    """Load a resumed optimiser state; one that does not fit the parameters is a UserError."""
    fix = ("; the checkpoint is damaged or of another run: drop ", Option("resume", switch=True), " to start over")
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as exc:
        raise UserError(f"{path}: optimizer state does not fit ({type(exc).__name__}: {str(exc)[:100]})",
                        *fix) from None
    for group in optimizer.param_groups:   # load_state_dict checks counts, not shapes
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if name != "step" and isinstance(value, Tensor) and value.shape != p.shape:
                    raise UserError(f"{path}: optimizer state {name!r} has shape {tuple(value.shape)} for a "
                                    f"parameter of shape {tuple(p.shape)}", *fix)


def _dropout_off(model: nn.Module) -> None:
    """Dropout and stochastic depth off (DACS does so in the EMA teacher), BatchNorm untouched."""
    for m in model.modules():
        if isinstance(m, (nn.modules.dropout._DropoutNd, DropPath)):
            m.eval()


class Trainer:
    """The state of one run (data, student, teacher, ImageNet copy, optimiser) and its iteration.

    :meth:`step` computes the losses of one iteration and their gradients; :meth:`update` applies
    them (AdamW, then the teacher's EMA); :func:`adapt` loops over both and writes the outputs.
    """

    def __init__(self, config: AdaptConfig, log: Callable[[str], None] = print) -> None:
        self.config, self.log = config, log
        self.recipe = config.recipe
        self.run: RunFolder | None = None
        self.start = 0
        self.crop_hw: tuple[int, ...] | None = None
        self._check_settings()
        self._distribution()
        try:
            self._output()
            resume = self._read_resume()
            self._data()
            self._networks()
            opt_state = self._resume(resume) if resume is not None else None
            self._parallel(opt_state)
            self._loaders()
        except BaseException:
            self.close()
            raise

    @property
    def out(self) -> Path | None:
        """The output folder (None: nothing is written)."""
        return None if self.run is None else self.run.out

    def close(self) -> None:
        """Release the output folder (its lock; a folder made for a run that saved nothing goes)."""
        if self.run is not None:
            self.run.close()

    def _check_settings(self) -> None:
        """Values that need no file: checked before anything is read or created."""
        c, r = self.config, self.recipe
        if r.iters < 1 or r.batch_size < 1:
            raise UserError(f"iterations ({r.iters}) and batch size ({r.batch_size}) must be at least 1")
        if r.warmup_iters < 0 or r.lr <= 0:
            raise UserError(f"recipe: warmup_iters ({r.warmup_iters}) must be 0 or more and lr ({r.lr}) positive")
        if c.workers is not None and c.workers < 0:
            raise UserError(Option("workers", c.workers), ": must be 0 or more")
        for name in ("save_every", "log_every"):
            if getattr(c, name) < 1:
                raise UserError(Option(name, getattr(c, name)), ": must be at least 1")
        if c.crop_size is not None and (len(c.crop_size) != 2 or min(c.crop_size) < 1):
            raise UserError(Option("crop_size", tuple(c.crop_size)), ": must be two positive sizes (h, w)")
        if c.resume and c.out is None:
            raise UserError(Option("resume", switch=True), " needs ", Option("out"),
                            ", the folder of the run to continue")
        self.amp = None if c.amp in (None, "none") else c.amp
        autocast(torch.device(c.device), self.amp)   # validates the combination before any work
        self.compile = compile_mode(c.compile) or ("default" if c.compile_blocks else None)
        # CUDA graphs (reduce-overhead; on a CPU inductor leaves them out, the rest is the same)
        # replay into a memory pool that a later replay reuses: see _parallel and step
        self.graph_steps = self.compile == "reduce-overhead"
        self.uda = r.uda and c.target is not None

    def _distribution(self) -> None:
        """Join torchrun's process group (if any) and pick this rank's device."""
        device = torch.device(self.config.device)
        self.dist_on = distributed.init_from_env()
        if device.type == "cuda" and self.dist_on:   # init_from_env bound this rank to GPU LOCAL_RANK
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.rank, self.world = distributed.get_rank(), distributed.get_world_size()

    def _output(self) -> None:
        """Check (and on rank 0 create and lock) the output folder before any work."""
        c = self.config
        if c.out is not None:
            self.run = RunFolder.open(c.out, resume=c.resume, force=c.force, main=distributed.is_main_process())

    def _read_resume(self) -> Any:
        """The checkpoint to resume, read and checked before the data and networks are built."""
        if not (self.config.resume and self.run is not None):
            return None
        return _read_checkpoint(self.run.out / LATEST, self.config.arch, self.recipe.iters)

    def _data(self) -> None:
        """Readers, crops (capped to the images), rare-class sampling, the validation set."""
        from domainmerge.data.rcs import RareClassSampler
        from domainmerge.data.training import TrainSet, recipe_crops

        c, r = self.config, self.recipe
        source_reader = _reader(c.source, "source")
        target_reader = _reader(c.target, "target", images_only=True) if self.uda else None
        self.val_reader = _reader(c.val, "val") if c.val is not None else None
        if self.val_reader is not None:
            _check_val(self.val_reader)
        kinds = [str(s[0]) if isinstance(s, (tuple, list)) else "" for s in (c.source, c.target)]
        source_crop, target_crop = recipe_crops("hrda" if r.hrda else "daformer", kinds[0], kinds[1])
        if c.crop_size is not None:
            size = (int(c.crop_size[0]), int(c.crop_size[1]))
            source_crop = dataclasses.replace(source_crop, crop=size)
            target_crop = dataclasses.replace(target_crop, crop=size)
        source_crop = _fit_crop(source_reader, c.source_crop or source_crop, "source", self.log)
        target_crop = c.target_crop or target_crop
        if r.pseudo_margins is not None:
            target_crop = dataclasses.replace(target_crop, pseudo_margins=r.pseudo_margins)
        self.target_set = None
        if target_reader is not None:
            target_crop = _fit_crop(target_reader, target_crop, "target", self.log)
            self.target_set = TrainSet(target_reader, target_crop, seed=c.seed + 1, labeled=False)
        # last: counting classes reads every label of the source
        rcs = RareClassSampler.from_dataset(source_reader, temperature=r.rcs_temperature,
                                            min_pixels=r.rcs_min_pixels,
                                            min_crop_ratio=r.rcs_min_crop_ratio) if r.rcs else None
        self.source_set = TrainSet(source_reader, source_crop, seed=c.seed, labeled=True, rcs=rcs)

    def _networks(self) -> None:
        """The student (initialised, pretrained weights checked), its teacher and ImageNet copy."""
        from domainmerge.models import build_model
        from domainmerge.tensors import nonfinite_keys, nonfinite_message

        c, r = self.config, self.recipe
        torch.manual_seed(c.seed)
        model = build_model(c.arch, num_classes=NUM_CLASSES, **c.arch_options)
        self.is_hrda = hasattr(model, "hr_crop_size")
        if r.hrda and not self.is_hrda:
            raise UserError(Option("recipe", "hrda"), f" needs an HRDA architecture (hrda_*), got {c.arch}")
        if c.init_state is not None:
            model.load_state_dict(c.init_state)
        elif c.pretrained is not None:
            from domainmerge.models.pretrained import load_pretrained

            self.log(load_pretrained(model, c.pretrained, trust_pickle=c.trust_pickle))
        bad = nonfinite_keys(model.state_dict())
        if bad:   # as evaluate and merge refuse them: training from NaN only fails later, less clearly
            raise UserError(nonfinite_message(str(c.pretrained or "the initial weights"), bad))
        model.to(self.device)
        if c.channels_last and self.device.type == "cuda":   # teacher and ImageNet copy inherit it
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.use_fd = self.uda and r.fd_lambda > 0
        self.imnet = frozen_copy(model).eval() if self.use_fd else None
        self.teacher = frozen_copy(model) if self.uda else None
        self.model = model

    def _resume(self, ck: Any) -> Any:
        """Load the networks of a checked checkpoint; returns its optimiser state."""
        assert self.run is not None
        path = self.run.out / LATEST
        parts = DA_TRAINING.networks(ck.state_dict())
        for role, net in (("student", self.model), ("teacher", self.teacher), ("imnet", self.imnet)):
            if net is None:
                continue
            part = parts[role]
            missing = sorted(set(net.state_dict()) - set(part))
            if missing:
                key = DA_TRAINING.prefix(role) + missing[0]
                raise UserError(f"{path}: key {key!r} is missing; the checkpoint is incomplete or "
                                f"of another run; drop ", Option("resume", switch=True), " to start over")
            try:
                net.load_state_dict(part)
            except RuntimeError as exc:
                first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
                raise UserError(f"{path}: does not fit {self.config.arch} ({first[:160]})") from None
        self.start = int(ck.extras["meta"]["iter"])
        self.run.trim_log(self.start)
        self.log(f"resuming {path} at iteration {self.start}")
        return ck.extras.get("optimizer")

    def _parallel(self, opt_state: Any) -> None:
        """Global BatchNorm and DDP across ranks, the optimiser (resumed state), training modes."""
        model = self.model
        if self.dist_on and self.world > 1:
            from domainmerge.training.syncbn import sync_batchnorm

            model = sync_batchnorm(model, self.device)
            self.teacher = sync_batchnorm(self.teacher, self.device) if self.teacher is not None else None
        self.model = model
        self.student: nn.Module = Student(model, channels_last=self.config.channels_last
                                          and self.device.type == "cuda")
        self.optimizer = build_optimizer(model, self.recipe)
        if opt_state is not None:
            _load_optimizer(self.optimizer, opt_state, self.run.out / LATEST if self.run else Path(LATEST))
        if self.dist_on and self.world > 1:
            self.student = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16" and self.device.type == "cuda")
        model.train()
        if self.teacher is not None:
            self.teacher.train()
            _dropout_off(self.teacher)
        # Under autocast the teacher and the ImageNet copy run as CastShadows: their weights' casts
        # made once (the teacher's re-made after each EMA), not at every forward; same outputs.
        low = AMP_DTYPES[self.amp] if self.amp is not None else None
        self.teacher_shadow = CastShadow(self.teacher, low) if low is not None and self.teacher is not None else None
        imnet_shadow = CastShadow(self.imnet, low) if low is not None and self.imnet is not None else None
        self.teacher_fwd = self.teacher_shadow.module if self.teacher_shadow is not None else self.teacher
        self.imnet_fwd = imnet_shadow.module if imnet_shadow is not None else self.imnet
        # the student's casts as leaves of their own (see GradShadow; under DDP see _step)
        self.grad_shadow = GradShadow(model, low) if low is not None else None
        self.parameters = list(model.parameters())   # the float32 ones, also while the leaves stand in
        if self.compile is not None:
            # CUDA graphs for the student only: the teacher and the ImageNet copy chain compiled
            # parts without a backward pass (backbone, then head), where a new graph step would
            # start at the head and free the backbone's outputs it reads
            frozen = "default" if self.graph_steps else self.compile
            for net, mode in ((model, self.compile), (self.teacher_fwd, frozen), (self.imnet_fwd, frozen)):
                if net is not None:
                    compile_parts(net, mode, blocks=self.config.compile_blocks)
        if self.graph_steps:
            # An iteration accumulates gradients over 2-3 backward passes, each starting a new graph
            # step, which would free the graphs' gradient outputs that .grad holds: .grad stays in
            # buffers of its own, zeroed, never freed (0 + g is g: the same gradients)
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)

    def validation_stance(self) -> contextlib.AbstractContextManager[Any]:
        """How validation runs the compiled student: eagerly under CUDA graphs (inference chains
        compiled parts, see :meth:`_parallel`; validation is rare), else as compiled."""
        return torch.compiler.set_stance("force_eager") if self.graph_steps else contextlib.nullcontext()

    def _loaders(self) -> None:
        """Endless iterators of this rank's batches from the start iteration (worker errors: one line)."""
        from domainmerge.data.training import batches

        b, w = self.recipe.batch_size, self.config.workers
        if w is None:   # worker processes only pay off for datasets read from files
            w = 0 if getattr(self.source_set.reader, "in_memory", False) else 2
        pin = self.device.type == "cuda"   # page-locked batches: their copies to the GPU do not block
        self.src_iter = loader_errors(batches(self.source_set, b, start_iter=self.start, rank=self.rank,
                                              world_size=self.world, workers=w, pin_memory=pin))
        self.tgt_iter = loader_errors(batches(self.target_set, b, start_iter=self.start, rank=self.rank,
                                              world_size=self.world, workers=w, pin_memory=pin)) \
            if self.target_set is not None else None

    def _forward(self, views: list[tuple[Tensor, Tensor, Tensor | None, str]], it: int, slots: list[int]
                 ) -> list[tuple[Tensor, list[Tensor]]]:
        """Segmentation loss of the student (and its backbone features) per view ``(images, labels,
        weights, stream)``, in one forward: uint8 images are normalised here, float ones are
        already normalised (the strong augmentation's). Each view draws its HRDA boxes and
        stochastic depth from its own stream, as a forward of its own would."""
        seed = self.config.seed
        boxes = [_boxes(self.is_hrda, self.model, tuple(x.shape[-2:]), self.recipe, seed, it, slots, stream)
                 for x, _, _, stream in views]
        inputs = [x if x.is_floating_point() else normalize(x) for x, _, _, _ in views]
        streams = ["drop_" + stream.removeprefix("hrda_") for _, _, _, stream in views]
        with autocast(self.device, self.amp), drop_path_noise(self.model, seed, it, slots, streams,
                                                              calls_per_stream=2 if self.is_hrda else 1):
            outs = self.student(inputs, boxes if self.is_hrda else None)
        return [(_seg_loss(logits, detail, labels, weight, bx, self.recipe), feats)
                for (logits, detail, feats), (_, labels, weight, _), bx in zip(outs, views, boxes, strict=True)]

    def step(self, it: int) -> dict[str, Any]:
        """Losses of iteration ``it`` (0-based) backpropagated into the student's gradients.

        Returns {'losses': {name: tensor}, 'pseudo_weight': 0-dim tensor or None, 'lr': float}; the
        tensors stay on the training device (nothing here waits for the GPU: :class:`LossLog`
        reads them every few iterations).

        The teacher's pseudo-labels come first; then the student's views (source, ClassMix, MIC)
        go through a forward and a backward each, as the authors' trainer runs them, or, with
        ``AdaptConfig.one_pass``, through one forward (a MiT backbone takes them in one call, the
        heads run per view, so BatchNorm sees each view alone as before) and one backward of the
        losses' sum: the same gradients up to the order of float sums, about half the kernels
        of a MiT iteration, and the views' activations held together (up to 3x the memory).
        """
        with self.cast_once():
            return self._step(it)

    @contextlib.contextmanager
    def cast_once(self) -> Iterator[None]:
        """The iteration's casts of the student's weights under autocast, made once: its
        :class:`~domainmerge.training.shadows.GradShadow` (the casts as one multi-tensor copy,
        the gradients back to float32 by multi-tensor operators after each backward pass),
        inside a :func:`~domainmerge.runtime.precision.cast_once` region for any other weight
        autocast casts. The weights change only in :meth:`update`, outside it. The same numbers
        as a cast per forward, to the bit."""
        shadow = self.grad_shadow.swapped() if self.grad_shadow is not None else contextlib.nullcontext()
        with cast_once(self.device, self.amp), shadow:
            yield

    def _step(self, it: int) -> dict[str, Any]:
        r, dev, seed = self.recipe, self.device, self.config.seed
        if self.graph_steps:
            torch.compiler.cudagraph_mark_step_begin()
        torch.manual_seed(int(sample_generator(seed, it, self.rank, "dropout").initial_seed()))
        lr = set_lr(self.optimizer, it, r)
        slots = [self.rank * r.batch_size + j for j in range(r.batch_size)]
        src = next(self.src_iter)
        # pinned host memory on CUDA (see batches): the copies overlap the queued kernels
        xs, ys = src["image"].to(dev, non_blocking=True), src["label"].to(dev, non_blocking=True)
        self.crop_hw = tuple(xs.shape[-2:])
        losses: dict[str, Tensor] = {}
        self.optimizer.zero_grad(set_to_none=not self.graph_steps)
        views: list[tuple[Tensor, Tensor, Tensor | None, str]] = [(xs, ys, None, "hrda_source")]
        share = None
        if self.uda:
            # 2. pseudo-labels of the teacher on the clean target images (they depend on no
            #    student forward, so they come first: the views below can then go in one forward)
            assert self.teacher_fwd is not None and self.tgt_iter is not None
            tgt = next(self.tgt_iter)
            xt = tgt["image"].to(dev, non_blocking=True)
            with torch.no_grad(), autocast(dev, self.amp):
                t_logits = resized_logits(self.teacher_fwd(normalize(xt)).float(), xt.shape[-2:])
            plabel, confident = pseudo_labels(t_logits, r.pseudo_threshold)
            pweight, share = pseudo_weight(confident, plabel, r.ignore_top, r.ignore_bottom)
            if "valid" in tgt:   # HRDA's pseudo-label margins, cut from the stored image like the crop
                pweight = pweight * tgt["valid"].to(dev, non_blocking=True)

            # 3. ClassMix: each slot's target image gets half of the global batch's source classes
            #    (DACS get_class_masks); strong augmentation of the mixed batch, one kornia call per image
            mask = classmix_masks(ys, [sample_generator(seed, it, slot, "classmix") for slot in slots])
            mixed = strong_augment(mix(mask, xs, xt), seed=seed, iteration=it, slots=slots, stream="jitter_mix",
                                   strength=r.jitter_strength, jitter_skip=r.jitter_skip, blur=r.blur,
                                   per_image=True)
            views.append((mixed, mix(mask, ys, plabel), mix(mask, torch.ones_like(pweight), pweight), "hrda_mix"))

            # 4. MIC: the target batch, augmented as one kornia call and block-masked after
            #    normalisation, against the same pseudo-labels and weights
            if r.mic:
                augmented = strong_augment(xt, seed=seed, iteration=it, slots=slots, stream="jitter_mic",
                                           strength=r.jitter_strength, jitter_skip=r.jitter_skip, blur=r.blur,
                                           per_image=False)
                keep = block_masks(augmented.shape[-2], augmented.shape[-1], r.mask_block_size, r.mask_ratio,
                                   [sample_generator(seed, it, slot, "mic_mask") for slot in slots], dev)
                views.append((mask_image(augmented, keep), plabel, pweight, "hrda_mic"))

        # 1., 3., 4.: the student's losses; a backward per view as the authors, or one for all
        # (one_pass: the losses' sum, whose gradient is the sum of theirs)
        names = iter(("source", "pseudo", "mic"))
        groups = [views] if self.config.one_pass else [[v] for v in views]
        # Under DDP the gradients are reduced once, at the last backward: the earlier ones
        # accumulate locally (no_sync), so the ranks exchange the views' sum once per iteration
        # instead of once per view (the same average, summed in another order). With the
        # GradShadow, DDP never sees the cast weights' gradients (they reach .grad outside
        # autograd): every backward runs under no_sync, and the gradients are averaged after the
        # last one as DDP's default reduction averages them
        ddp = self.student if isinstance(self.student, nn.parallel.DistributedDataParallel) else None
        local = ddp is not None and self.grad_shadow is not None
        for g, group in enumerate(groups):
            with ddp.no_sync() if ddp is not None and (local or g < len(groups) - 1) else contextlib.nullcontext():
                total: Tensor | None = None
                for loss, feats in self._forward(group, it, slots):
                    name = next(names)
                    if name == "mic":
                        loss = r.mic_lambda * loss
                    losses[name] = loss.detach()
                    if name == "source" and self.use_fd:   # feature distance on the source view
                        fd = self._feature_distance(xs, ys, feats)
                        losses["fd"] = fd.detach()
                        loss = loss + fd
                    total = loss if total is None else total + loss
                assert total is not None
                self.scaler.scale(total).backward()
                if self.grad_shadow is not None:
                    self.grad_shadow.collect()
        if local:
            distributed.average_gradients(self.parameters)
        return {"losses": losses, "pseudo_weight": share, "lr": lr}

    def _feature_distance(self, xs: Tensor, ys: Tensor, feats: list[Tensor]) -> Tensor:
        """lambda x mean L2 distance to the ImageNet copy's deepest features over the global thing mask."""
        r = self.recipe
        assert self.imnet_fwd is not None
        with torch.no_grad():
            view = normalize(xs)
            if self.is_hrda:   # HRDA compares the context (half-resolution) features
                view = F.interpolate(view, scale_factor=float(cast(float, self.model.lr_scale)), mode="bilinear",
                                     align_corners=False)
            with autocast(self.device, self.amp):   # as the student's forward (fp32 without --amp)
                ref = cast(nn.Module, self.imnet_fwd.backbone)(view)[-1]
        dsum, count = feature_distance(feats[-1], ref, ys, r.fd_classes, r.fd_min_ratio, NUM_CLASSES)
        # The mean over the global mask, x world size because DDP averages the ranks' gradients.
        # The count stays on the device (no host round trip). An empty mask has dsum = 0 with a
        # zero gradient, so clamping its count to 1 gives the 0 the recipe asks for.
        total = distributed.all_reduce_sum(count.reshape(1))[0].clamp(min=1.0)
        # world / total as a true division (int / tensor multiplies by a rounded reciprocal), rounded
        # to float32 as a Python scalar factor is: the recipe's float32 arithmetic, to the bit
        scale = (total.new_full((), float(self.world)) / total).to(dsum.dtype)
        return r.fd_lambda * dsum * scale

    def update(self, it: int) -> None:
        """AdamW step, then the teacher's EMA with the rate of iteration ``it + 1`` (neither waits
        for the GPU)."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.teacher is not None:
            ema_update(self.teacher, self.model, self.recipe.alpha, it + 1)
            if self.teacher_shadow is not None:
                self.teacher_shadow.refresh()


class NonFiniteLoss(Exception):
    """A loss of iteration ``iteration`` (1-based) was not finite."""

    def __init__(self, iteration: int, name: str, value: float) -> None:
        super().__init__(f"iteration {iteration}: the {name} loss is {value}")
        self.iteration, self.name, self.value = iteration, name, value


class LossLog:
    """The iterations' loss values and pseudo-label shares, kept on the training device and read
    in one piece by :meth:`flush` (one collective, one host copy): reading them every iteration
    would make the host wait for the GPU each time and leave the GPU idle while it queues the
    next iteration. Every rank must flush at the same iterations (it is a collective).

    :meth:`flush` returns the window's records in order and raises :class:`NonFiniteLoss` for
    its first iteration with a non-finite loss (the rank-averaged values, so all ranks agree).
    The caller flushes before anything that must not see a broken state (a checkpoint, a
    validation), so a non-finite loss is found before its weights are written.
    """

    def __init__(self, world: int, images_per_iter: int) -> None:
        self.world, self.images_per_iter = world, images_per_iter
        self.rows: list[tuple[int, float, Tensor, Tensor | None]] = []
        self.names: list[str] = []
        self.t_last = time.perf_counter()

    def add(self, it: int, state: Mapping[str, Any]) -> None:
        losses: dict[str, Tensor] = state["losses"]
        self.names = [k for k in LOSSES if k in losses]
        values = torch.stack([losses[k].detach().float().reshape(()) for k in self.names])
        self.rows.append((it, float(state["lr"]), values, state["pseudo_weight"]))

    def flush(self) -> list[dict[str, Any]]:
        if not self.rows:
            return []
        # summed over ranks, then / world: the order of the per-iteration reduction before
        values = (distributed.all_reduce_sum(torch.stack([row[2] for row in self.rows])) / self.world).cpu()
        shares = [row[3] for row in self.rows]
        share_values = (torch.stack(cast(list[Tensor], shares)).cpu().tolist()
                        if all(x is not None for x in shares) else [None] * len(shares))
        now = time.perf_counter()
        rate = self.images_per_iter * len(self.rows) / max(now - self.t_last, 1e-9)
        self.t_last = now
        rows, self.rows = self.rows, []
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            i, j = int(bad[0, 0]), int(bad[0, 1])
            raise NonFiniteLoss(rows[i][0] + 1, self.names[j], float(values[i, j]))
        records = []
        for (it, lr, _, _), vals, share in zip(rows, values.tolist(), share_values):
            record: dict[str, Any] = {"iter": it + 1, "lr": lr, **{f"loss_{k}": v for k, v in zip(self.names, vals)},
                                      "images_per_s": rate}
            if share is not None:
                record["pseudo_weight"] = share
            records.append(record)
        return records


def adapt(config: AdaptConfig, *, log: Callable[[str], None] = print) -> AdaptResult:
    """Train ``config.arch`` on the labelled source and (self-training) the unlabelled target.

    With ``config.out``: ``OUT/latest.pth`` and ``OUT/iter_N.pth`` every ``save_every`` iterations
    and at the end (atomic; iter_N is a hard link of latest), and ``OUT/log.jsonl`` every
    ``log_every`` iterations (losses, pseudo-label weight, learning rate, images/s) and after each
    validation (mIoU). Checkpoints are the authors' container: ``{'meta': {'iter', 'CLASSES',
    'PALETTE', 'domainmerge'}, 'state_dict': {'model.*', 'ema_model.*', 'imnet_model.*'},
    'optimizer': ...}``. A non-finite loss stops the run with a UserError naming the iteration;
    the losses are read from the device every ``log_every`` iterations and before each checkpoint
    and validation (:class:`LossLog`), so no checkpoint holds the state after it.

    Args:
        config: the run (:class:`AdaptConfig`: data, network, recipe, outputs, device).
        log: called with each progress line.

    Returns:
        An :class:`AdaptResult`: the student and teacher state dicts (CPU copies), the log records,
        the validations, the iterations run and the last checkpoint written (None without ``out``).

    Example:
        >>> from domainmerge import AdaptConfig, adapt, build_dataset, get_recipe
        >>> from domainmerge.data.training import CropConfig
        >>> source, target = (build_dataset("synthetic", domain, "train", length=2, size=(32, 64))
        ...                   for domain in ("game", "night"))
        >>> recipe = get_recipe("daformer", iters=2, batch_size=1, warmup_iters=1, ignore_top=0, ignore_bottom=0,
        ...                     rcs_min_pixels=0)
        >>> result = adapt(AdaptConfig(source, target, arch="tiny_daformer_r", recipe=recipe, progress=False,
        ...                            source_crop=CropConfig(), target_crop=CropConfig()), log=lambda line: None)
        >>> result.iterations, len(result.records), sorted(result.records[0])[:3]
        (2, 2, ['images_per_s', 'iter', 'loss_fd'])
    """
    from tqdm import tqdm

    tr = Trainer(config, log)
    r, out, world = tr.recipe, tr.out, tr.world
    records: list[dict[str, Any]] = []
    validation: list[dict[str, Any]] = []
    main = distributed.is_main_process()
    end = r.iters if config.stop_at is None else min(config.stop_at, r.iters)
    bar = tqdm(total=end, initial=tr.start, desc=config.desc, disable=not (config.progress and main),
               dynamic_ncols=True, mininterval=1.0, leave=False)
    last_saved: Path | None = (out / LATEST) if (out is not None and tr.start > 0) else None
    losslog = LossLog(world, (2 if tr.uda else 1) * r.batch_size * world)
    try:
        for it in range(tr.start, end):
            losslog.add(it, tr.step(it))
            tr.update(it)
            bar.update(1)
            n = it + 1
            log_now = n % config.log_every == 0 or n == end
            validate = tr.val_reader is not None and config.val_every > 0 and (n % config.val_every == 0 or n == end)
            save = tr.run is not None and (n % config.save_every == 0 or n == end)
            if not (log_now or validate or save):
                continue
            # The values are read here, before a checkpoint or a validation can see a broken state.
            try:
                window = losslog.flush()
            except NonFiniteLoss as e:
                kept = f"; {last_saved} stays" if last_saved is not None else ""
                raise UserError(f"{e}; training stopped{kept} (lower the learning rate or check the data)") from None
            records.extend(window)
            record = window[-1]
            if log_now:
                if tr.run is not None:
                    tr.run.log(record)
                bar.set_postfix({k[5:]: f"{v:.3g}" for k, v in record.items() if k.startswith("loss_")})
            # the checkpoint first: a validation that fails must not cost the iteration's weights
            if save:
                assert tr.run is not None
                last_saved = _checkpoint(tr.run, n, tr, config) or last_saved
            if validate:
                with tr.validation_stance():
                    validation.append(_validate(tr.model, tr.val_reader, config, tr.is_hrda, n, log, tr.run))
    finally:
        bar.close()
        tr.close()
    return AdaptResult(student={k: v.detach().cpu().clone() for k, v in tr.model.state_dict().items()},
                       teacher=None if tr.teacher is None else {k: v.detach().cpu().clone()
                                                               for k, v in tr.teacher.state_dict().items()},
                       records=records, validation=validation, iterations=end, checkpoint=last_saved)


def _boxes(is_hrda: bool, model: nn.Module, size: tuple[int, ...], r: Recipe, seed: int, it: int, slots: list[int],
           stream: str) -> list[tuple[int, int, int, int]] | None:
    if not is_hrda:
        return None
    hr_crop = cast(tuple[int, int], model.hr_crop_size)
    crop = (min(hr_crop[0], size[0]), min(hr_crop[1], size[1]))
    if r.detail_boxes == "batch":   # HRDA: one box for the (global) batch, drawn from (seed, iteration)
        box = detail_box(size[0], size[1], crop, r.crop_divisible, sample_generator(seed, it, SHARED, stream))
        return [box] * len(slots)
    return [detail_box(size[0], size[1], crop, r.crop_divisible, sample_generator(seed, it, slot, stream))
            for slot in slots]


def _seg_loss(logits: Tensor, detail: Tensor | None, labels: Tensor, weight: Tensor | None,
              boxes: list[tuple[int, int, int, int]] | None, r: Recipe) -> Tensor:
    loss = weighted_ce(logits, labels, weight)
    if detail is None or boxes is None or r.detail_loss_weight == 0:
        return loss
    detail_loss = weighted_ce(detail, crop_to(labels, boxes), None if weight is None else crop_to(weight, boxes))
    return hrda_loss(loss, detail_loss, r.detail_loss_weight)


def _validate(model: nn.Module, reader: Any, config: AdaptConfig, is_hrda: bool, n: int,
              log: Callable[[str], None], run: RunFolder | None) -> dict[str, Any]:
    from domainmerge.evaluation import evaluate_model

    mode = config.val_mode or ("slide" if is_hrda else "whole")
    scores = evaluate_model(model, reader, mode=mode, device=config.device, progress=False, amp=config.amp
                            if config.amp not in (None, "none") else None, desc="val")
    model.train()
    entry = {"iter": n, "val": scores.to_dict()}
    if distributed.is_main_process():
        from domainmerge.reporting import class_table

        log(f"iteration {n}: validation mIoU {scores.miou:.2f}\n{class_table({'val': scores})}")
        if run is not None:
            run.log({"iter": n, "val_miou": scores.miou})
    return entry


def _checkpoint(run: RunFolder, n: int, tr: Trainer, config: AdaptConfig) -> Path | None:
    """Rank 0 writes ``latest.pth`` atomically and links it as ``iter_N.pth`` (RunFolder.save)."""
    if not run.main:
        return None
    # The DA-training container: student, EMA teacher, frozen ImageNet copy (those the run has).
    sd = DA_TRAINING.wrap(**{role: {k: v.detach().cpu() for k, v in net.state_dict().items()}
                             for role, net in (("student", tr.model), ("teacher", tr.teacher), ("imnet", tr.imnet))
                             if net is not None})
    record = {"arch": config.arch, "recipe": asdict(config.recipe), "seed": config.seed, "world_size": tr.world,
              "batch_size": config.recipe.batch_size, "crop": list(tr.crop_hw) if tr.crop_hw else None,
              "source": _describe(config.source), "target": _describe(config.target)}
    payload = {"meta": {"iter": n, "CLASSES": list(CLASSES), "PALETTE": [list(p) for p in PALETTE],
                        "domainmerge": record},
               "state_dict": sd, "optimizer": tr.optimizer.state_dict()}
    return run.save(n, payload)


def _describe(spec: Any) -> str | None:
    if spec is None:
        return None
    if isinstance(spec, (tuple, list)):
        return " ".join(map(str, spec))
    return type(spec).__name__


__all__ = ["AdaptConfig", "AdaptResult", "LossLog", "NonFiniteLoss", "Student", "Trainer", "adapt"]
