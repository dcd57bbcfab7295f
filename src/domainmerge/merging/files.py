"""Merging checkpoint files into checkpoint files: the library behind ``domainmerge merge``.

:func:`merge_files` streams: it reads the K inputs one tensor at a time (see
:mod:`domainmerge.merging.engine`) and writes every merged tensor as it comes through the one
checkpoint writer (:func:`domainmerge.checkpoint.checkpoint_writer`), so merging K large
checkpoints holds a handful of tensors, not K models. The output keeps the first input's
container (``meta`` and other entries kept, ``optimizer`` dropped) and records the merge in
``meta['domainmerge']`` (or the safetensors metadata). The methods that read target images
(``fisher``, ``adamerging``) need whole networks and run through the same function.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from domainmerge.checkpoint import (
    Checkpoint,
    TensorInfo,
    checkpoint_writer,
    network_prefix,
    open_checkpoint,
    output_format,
    strip_model_prefix,
)
from domainmerge.errors import MergeError, Option
from domainmerge.fsutil import check_output_path
from domainmerge.merging.engine import (
    DictSource,
    MergeOptions,
    Source,
    StrippedSource,
    check_methods,
    check_options,
    iter_merged,
    plan_merge,
)
from domainmerge.merging.parameters import normalise_weights
from domainmerge.merging.roles import KeyRule
from domainmerge.version import __version__

# The methods that read unlabeled target images (each output says so).
DATA_METHODS = ("fisher", "adamerging")
# Output dtypes a merge may be asked for.
DTYPES = ("float16", "bfloat16", "float32", "float64")

PathLike = str | os.PathLike[str]
# A target domain for the data-using methods: (name, dataset kind, root, split).
DomainSpec = tuple[str, str, str, str]


@dataclass
class MergeReport:
    """What :func:`merge_files` wrote and how.

    ``tensors``: how many tensors each rule handled ('parameter', 'bn_mean', 'bn_var',
    'counter', 'copied from first', 'head (kept per model)' ...); ``bn_layers``: BatchNorm
    layers pooled; ``dtypes``/``input_dtypes``: the floating dtypes written and read;
    ``dtype_given``: whether the output dtype was asked for (else the widest input's);
    ``record``: what was written into the output's ``meta['domainmerge']``; ``alignment``:
    input file name -> :class:`~domainmerge.alignment.matching.AlignmentReport` (``align=True``);
    ``images``: target images read per domain (data-using methods); ``coefficients``: the JSON
    file of AdaMerging's coefficients; ``seconds``: wall time.
    """

    inputs: list[Path]
    outputs: list[Path]
    method: str
    buffers: str
    weights: list[float]
    record: dict[str, Any]
    tensors: dict[str, int] = field(default_factory=dict)
    bn_layers: int = 0
    dtypes: list[str] = field(default_factory=list)
    input_dtypes: list[str] = field(default_factory=list)
    dtype_given: bool = False
    base: Path | None = None
    lam: float = 1.0
    alignment: dict[str, Any] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    coefficients: Path | None = None
    seconds: float = 0.0

    @property
    def uses_target_data(self) -> bool:
        """Whether the merge read target images (``fisher``, ``adamerging``)."""
        return self.method in DATA_METHODS


def head_output_paths(output: PathLike, n: int, names: Sequence[str] | None) -> list[Path]:
    """The outputs of a merge that keeps each model's head: ``merged.pth`` with names ``[cs,
    idd]`` -> ``merged.cs.pth``, ``merged.idd.pth`` (1-based indices without names)."""
    out = Path(output)
    if names is not None and len(names) != n:
        raise MergeError(Option("names"), f": got {len(names)} names for {n} inputs; give one name per input")
    labels = list(names) if names else [str(i + 1) for i in range(n)]
    if len(set(labels)) != len(labels):
        raise MergeError(Option("names"), f": names must differ, got {labels}")
    return [out.with_name(f"{out.stem}.{label}{out.suffix}") for label in labels]


def _torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MergeError(Option("dtype", dtype), f": unknown; use one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)  # type: ignore[no-any-return]


def _dtype_names(dtypes: Any) -> list[str]:
    return sorted({str(d).replace("torch.", "") for d in dtypes if d.is_floating_point})


def merge_files(paths: Sequence[PathLike], out: PathLike, *, weights: Sequence[float] | None = None,
                buffers: str = "gaussian", counts: Sequence[float] | None = None, method: str = "linear",
                base: PathLike | None = None, lam: float = 1.0, density: float = 0.2, drop: float = 0.9,
                seed: int = 0, rules: Sequence[KeyRule] = (), keep_heads: str | None = None,
                names: Sequence[str] | None = None, only: str | None = None, prefix: str | None = None,
                dtype: torch.dtype | str | None = None, allow_missing: bool = False, align: bool = False,
                domains: Sequence[DomainSpec] | Mapping[str, Any] | None = None, images: int = 64,
                batch_size: int = 4, steps: int = 100, lr: float = 1e-3, granularity: str = "layer",
                device: str | torch.device | None = None, trust_pickle: bool = False, force: bool = False,
                progress: bool = False, log: Callable[[str], None] | None = None) -> MergeReport:
    """Merge checkpoint files into ``out``, streaming tensor by tensor (see the module doc).

    Every argument is checked, and every output path, before any tensor is read; outputs are
    written atomically (complete or absent) and never replace an input.

    Args:
        paths: two or more checkpoints (.pth/.pt/.bin/.ckpt/.safetensors) adapted from the same
            pretrained weights.
        out: the output file; its suffix picks the format (``.safetensors`` or a pickle).
        weights: one non-negative weight per input, normalised to sum 1 (default uniform).
        buffers: BatchNorm statistics: ``'gaussian'`` (pooled Gaussians weighted by
            num_batches_tracked, the paper's), ``'mean'`` or ``'first'``.
        counts: samples behind each input's BN statistics (default: each layer's counter).
        method: ``'linear'`` (the paper's weighted average), a task-vector method
            (``'task_arithmetic'``, ``'ties'``, ``'dare_linear'``, ``'dare_ties'``; they need
            ``base``) or one that reads unlabeled target images (``'fisher'``, ``'adamerging'``;
            they need ``domains``).
        base: the weights the models were adapted from (task vectors are taken against it).
        lam, density, drop, seed: task-vector scaling, TIES density, DARE drop rate and seed.
        rules: per-module overrides (:class:`~domainmerge.merging.roles.KeyRule`), first match wins.
        keep_heads: merge everything outside this prefix and write one output per input with its
            own tensors under it (the paper's dagger variant); ``names`` label those outputs
            (``out.NAME.pth``; default 1, 2, ...).
        only: merge only the keys under this prefix; copy the rest from the first input.
        prefix: merge only the network under this wrapper prefix, written without it
            (``'auto'``: ``model.`` when present, else ``module.``, else none).
        dtype: the output's floating dtype (default: the widest input's; accumulation is always
            float32 or wider).
        allow_missing: merge the keys all inputs share; copy the others from the first holder.
        align: permute every model onto the first (Git Re-Basin weight matching) first.
        domains: target images for ``fisher``/``adamerging``: ``(name, kind, root, split)``
            tuples or a mapping name -> dataset (one per model, in order, for ``fisher``);
            ``images`` over all domains, read ``batch_size`` at a time; ``steps``, ``lr`` and
            ``granularity`` (``'layer'`` or ``'model'``) drive AdaMerging; ``device`` runs them
            (default: cuda when available).
        trust_pickle: allow full unpickling (only for files you trust).
        force: replace existing outputs.
        progress: show a progress bar.
        log: called with a line before target images are read (e.g. ``print``).

    Returns:
        A :class:`MergeReport`: outputs, weights, tensors per rule, dtypes, the record written.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from domainmerge.checkpoint import load_state_dict
        >>> folder = Path(tempfile.mkdtemp())
        >>> for name, value in (("a", 1.0), ("b", 3.0)):
        ...     torch.save({"meta": {"iter": 10}, "state_dict": {"conv.weight": torch.full((2,), value)}},
        ...                folder / f"{name}.pth")
        >>> report = merge_files([folder / "a.pth", folder / "b.pth"], folder / "m.pth")
        >>> report.weights, report.tensors
        ([0.5, 0.5], {'parameter': 1})
        >>> load_state_dict(folder / "m.pth")["conv.weight"]
        tensor([2., 2.])
        >>> saved = torch.load(folder / "m.pth", weights_only=True)
        >>> saved["meta"]["iter"], saved["meta"]["domainmerge"]["inputs"]
        (10, ['a.pth', 'b.pth'])
    """
    from domainmerge.merging.recipe import recipe_from_options

    start = time.perf_counter()
    inputs = [Path(p) for p in paths]
    if len(inputs) < 2:
        raise MergeError("give at least two checkpoints to merge")
    if len({p.resolve() for p in inputs}) != len(inputs):
        raise MergeError("the same checkpoint is given twice; use ", Option("weights"), " to weigh a model more")
    rules = tuple(rules)
    per_model = bool(keep_heads) or any(r.keep_own for r in rules)
    if names and not per_model:
        raise MergeError(Option("names"), " only applies with ", Option("keep_heads"),
                         " (or a recipe rule with keep: own)")
    options = MergeOptions(weights=weights, buffers=buffers, counts=counts, keep_heads=keep_heads, only=only,
                           allow_missing=allow_missing, method=method, lam=lam, density=density, drop=drop,
                           seed=seed, rules=rules, dtype=_torch_dtype(dtype))
    check_options(options, len(inputs))
    outputs = head_output_paths(out, len(inputs), names) if per_model else [Path(out)]
    read = (*inputs, Path(base)) if base else tuple(inputs)
    for output in outputs:
        output_format(output)
        check_output_path(output, force=force, inputs=read)
    if method in DATA_METHODS:
        if keep_heads or align or only or rules:
            raise MergeError(Option("method", method), " merges whole networks: it does not combine with ",
                             Option("keep_heads"), ", ", Option("align"), ", ", Option("only"), " or rules")
        return _merge_with_data(inputs, outputs[0], options, base=Path(base) if base else None, domains=domains,
                                images=images, batch_size=batch_size, steps=steps, lr=lr,
                                granularity=granularity, device=device, trust_pickle=trust_pickle, force=force,
                                progress=progress, log=log, start=start)
    if domains:
        raise MergeError(Option("domains"), f": only read by the methods that use data ({', '.join(DATA_METHODS)})")
    check_methods(options, has_base=bool(base))   # before opening (and aligning) anything
    recipe = recipe_from_options([str(p) for p in inputs], options, base=str(base) if base else None,
                                 align=align, names=names)

    with contextlib.ExitStack() as stack:
        checkpoints = [stack.enter_context(open_checkpoint(p, trust_pickle=trust_pickle)) for p in inputs]
        base_ck = stack.enter_context(open_checkpoint(base, trust_pickle=trust_pickle)) if base else None
        sources: list[Source] = list(checkpoints)
        if prefix is not None:
            sources = [StrippedSource(ck, prefix) for ck in checkpoints]
        alignment: dict[str, Any] = {}
        if align:
            sources, alignment = _aligned(sources, checkpoints)
        plan = plan_merge(sources, options, base=base_ck)
        record = {
            "tool": f"domainmerge {__version__}",
            "inputs": [p.name for p in inputs],
            "weights": plan.weights,
            "buffers": buffers,
            "counts": list(counts) if counts else "num_batches_tracked",
            "keep_heads": keep_heads,
            "only": only,
            "prefix": prefix,
            "dtype": _dtype_names([options.dtype])[0] if options.dtype is not None else "widest input",
            "aligned": bool(align),
            "method": method,
            "recipe": recipe.record(),
        }
        _write_streamed(sources, plan, outputs, template=checkpoints[0], record=record, force=force,
                        progress=progress)
        input_dtypes = _dtype_names(i.dtype for ck in checkpoints for i in ck.infos.values())
    return MergeReport(
        inputs=inputs, outputs=outputs, method=method, buffers=buffers, weights=plan.weights, record=record,
        tensors={role: n for role, n in plan.stats.items() if role != "bn_layers"},
        bn_layers=plan.stats.get("bn_layers", 0), dtypes=_dtype_names(plan.dtypes.values()),
        input_dtypes=input_dtypes, dtype_given=options.dtype is not None, base=Path(base) if base else None,
        lam=lam, alignment=alignment, seconds=time.perf_counter() - start)


def _aligned(sources: list[Source], checkpoints: list[Checkpoint]) -> tuple[list[Source], dict[str, Any]]:
    """Every source permuted onto the first (weight matching), with the report per input file."""
    from domainmerge.alignment.matching import align_state_dicts

    ref = {k: sources[0].get(k) for k in sources[0].keys()}
    aligned: list[Source] = [DictSource(ref, str(checkpoints[0].path))]
    reports: dict[str, Any] = {}
    for ck, src in zip(checkpoints[1:], sources[1:]):
        permuted, report = align_state_dicts(ref, {k: src.get(k) for k in src.keys()})
        aligned.append(DictSource(permuted, str(ck.path)))
        reports[ck.path.name] = report
    return aligned, reports


def _write_streamed(sources: Sequence[Source], plan: Any, outputs: Sequence[Path], *, template: Checkpoint,
                    record: Mapping[str, Any], force: bool, progress: bool) -> None:
    """Write the plan's merged tensors to every output as they come."""
    from tqdm import tqdm

    infos = {k: TensorInfo(plan.shapes[k], plan.dtypes[k]) for k in plan.keys}
    bar = tqdm(plan.keys, desc="merging", unit="tensor", disable=None if progress else True)
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(checkpoint_writer(o, infos, template=template, record=record,
                                                         replace=force)) for o in outputs]
        for key, tensors in iter_merged(sources, plan):
            for writer, tensor in zip(writers, tensors):
                writer.write(key, tensor)
            bar.update()
    bar.close()


def _datasets(domains: Sequence[DomainSpec] | Mapping[str, Any]) -> dict[str, Any]:
    """name -> dataset (images only) of the data-using methods' ``domains``."""
    from domainmerge.data import image_dataset

    if isinstance(domains, Mapping):
        return dict(domains)
    return {name: image_dataset(kind, root, split) for name, kind, root, split in domains}


def _merge_with_data(inputs: list[Path], output: Path, options: MergeOptions, *, base: Path | None,
                     domains: Sequence[DomainSpec] | Mapping[str, Any] | None, images: int, batch_size: int,
                     steps: int, lr: float, granularity: str, device: str | torch.device | None,
                     trust_pickle: bool, force: bool, progress: bool, log: Callable[[str], None] | None,
                     start: float) -> MergeReport:
    """fisher / adamerging: build the network, read unlabeled target images, merge, write."""
    import json

    from domainmerge.checkpoint import save_checkpoint
    from domainmerge.data.sampling import image_batches, spread_indices
    from domainmerge.fsutil import write_text_atomic
    from domainmerge.merging.learned import adamerging, fisher_diagonal, fisher_merge
    from domainmerge.models import model_from_state_dict
    from domainmerge.runtime.device import resolve_device

    method = options.method
    if method == "adamerging" and base is None:
        raise MergeError(Option("method", method), " learns coefficients of task vectors; give the weights the "
                         "models were adapted from with ", Option("base"))
    if method == "fisher" and base is not None:
        raise MergeError(Option("method", method), " needs no ", Option("base"))
    if not domains:
        raise MergeError(Option("method", method), " reads unlabeled target images; give them with ",
                         Option("domains"))
    if method == "fisher" and len(domains) != len(inputs):
        raise MergeError(Option("method", method), " estimates each model's Fisher on its own target: give one ",
                         Option("domains"), f" per model, in the order of the models ({len(inputs)}), "
                         f"got {len(domains)}")
    for name, value in (("images", images), ("batch_size", batch_size)):
        if value < 1:
            raise MergeError(Option(name, value), ": must be at least 1")
    if steps < 0 or not lr > 0:
        raise MergeError(Option("steps"), " must be >= 0 and ", Option("lr"), f" > 0, got {steps} and {lr}")
    if granularity not in ("layer", "model"):
        raise MergeError(Option("granularity", granularity), ": use 'layer' or 'model'")
    coef_path = output.with_name(output.stem + ".coefficients.json") if method == "adamerging" else None
    if coef_path is not None:
        check_output_path(coef_path, force=force, inputs=tuple(inputs))
    run_on = device or resolve_device(None)
    datasets = _datasets(domains)
    indices = spread_indices({n: len(ds) for n, ds in datasets.items()}, images)

    def batches(name: str) -> list[torch.Tensor]:
        return list(image_batches(datasets, {name: indices[name]}, batch_size=batch_size))

    with contextlib.ExitStack() as stack:
        cks = [stack.enter_context(open_checkpoint(p, trust_pickle=trust_pickle)) for p in inputs]
        fulls = [ck.state_dict() for ck in cks]
        prefix = network_prefix(fulls[0])
        nets = [strip_model_prefix(sd, prefix) for sd in fulls]
        model = model_from_state_dict(nets[0])
        if log is not None:
            log(f"method {method} READS TARGET IMAGES: " + ", ".join(f"{d} {len(v)}" for d, v in indices.items()))
        extra: dict[str, Any] = {}
        if method == "fisher":
            fishers = [fisher_diagonal(model, sd, batches(name), device=run_on) for sd, name in zip(nets, datasets)]
            merged = fisher_merge(nets, fishers, options.weights, buffers=options.buffers, counts=options.counts)
        else:
            assert base is not None
            base_full = stack.enter_context(open_checkpoint(base, trust_pickle=trust_pickle)).state_dict()
            base_net = strip_model_prefix(base_full)
            result = adamerging(model, nets, base_net, [batches(n) for n in datasets], weights=options.weights,
                                granularity=granularity, steps=steps, lr=lr, buffers=options.buffers,
                                device=run_on, progress=progress)
            merged = result.state_dict
            extra = {"granularity": granularity, "steps": steps, "lr": lr, "base": base.name,
                     "entropy": [result.entropy[0], result.entropy[-1]] if result.entropy else []}
        full = dict(fulls[0])
        full.update({prefix + k: v for k, v in merged.items()})
        record = {"tool": f"domainmerge {__version__}", "inputs": [p.name for p in inputs], "method": method,
                  "buffers": options.buffers, "uses_target_data": True,
                  "images": {d: len(v) for d, v in indices.items()}, **extra}
        if coef_path is not None:
            write_text_atomic(coef_path, json.dumps({"models": record["inputs"], "granularity": granularity,
                                                     "coefficients": result.coefficients,
                                                     "entropy": result.entropy}, indent=1))
        save_checkpoint(output, full, template=cks[0], record=record, force=force, inputs=tuple(inputs))
    return MergeReport(inputs=inputs, outputs=[output], method=method, buffers=options.buffers,
                       weights=normalise_weights(options.weights, len(inputs)), record=record,
                       base=base, images=record["images"], coefficients=coef_path,
                       seconds=time.perf_counter() - start)


def merge_recipe_files(recipe: Any, out: PathLike, *, prefix: str | None = None,
                       dtype: torch.dtype | str | None = None, trust_pickle: bool = False, force: bool = False,
                       progress: bool = False) -> MergeReport:
    """:func:`merge_files` as a recipe says: ``recipe`` is a
    :class:`~domainmerge.merging.recipe.Recipe` or the path of a YAML file; the other arguments
    are the file options a recipe does not hold (as in :func:`merge_files`). The output records
    the same recipe as the equal call of :func:`merge_files`."""
    from domainmerge.merging.recipe import Recipe, load_recipe

    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    return merge_files(r.models, out, weights=r.weights, buffers=r.buffers, counts=r.counts, method=r.method,
                       base=r.base, lam=r.lam, density=r.density, drop=r.drop, seed=r.seed, rules=r.rules,
                       keep_heads=r.keep_heads, names=r.names, only=r.only, allow_missing=r.allow_missing,
                       align=r.align, prefix=prefix, dtype=dtype, trust_pickle=trust_pickle, force=force,
                       progress=progress)
