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
from typing import TYPE_CHECKING, Any

import torch

from domainmerge.checkpoint import (
    Checkpoint,
    TensorInfo,
    checkpoint_writer,
    open_checkpoint,
    output_format,
)
from domainmerge.errors import MergeError, Option
from domainmerge.fsutil import check_output_path
from domainmerge.merging.plan import MergePlan, plan_merge
from domainmerge.merging.sources import DictSource, Source, StrippedSource
from domainmerge.merging.spec import DATA_METHODS, AdaMerging, Fisher, MergeSpec
from domainmerge.merging.stream import iter_merged
from domainmerge.version import __version__

if TYPE_CHECKING:
    from domainmerge.data.readers import SegDataset

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
    file of AdaMerging's coefficients; ``rules``: each rule's pattern -> the keys it decided; ``seconds``: wall time.
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
    rules: dict[str, int] = field(default_factory=dict)
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


def merge_files(paths: Sequence[PathLike], out: PathLike, spec: MergeSpec | None = None, *,
                base: PathLike | None = None, domains: Sequence[DomainSpec] | Mapping[str, SegDataset] | None = None,
                prefix: str | None = None, dtype: torch.dtype | str | None = None,
                device: str | torch.device | None = None, trust_pickle: bool = False, force: bool = False,
                progress: bool = False, log: Callable[[str], None] | None = None) -> MergeReport:
    """Merge checkpoint files into ``out`` as ``spec`` says, streaming tensor by tensor (see the
    module doc).

    Every argument is checked, and every output path, before any tensor is read; outputs are
    written atomically (complete or absent) and never replace an input.

    Args:
        paths: two or more checkpoints (.pth/.pt/.bin/.ckpt/.safetensors) adapted from the same
            pretrained weights.
        out: the output file; its suffix picks the format (``.safetensors`` or a pickle). With
            ``spec.keep_heads`` (or a keep-own rule), one output per input, ``out.NAME.pth``
            (``spec.names``; default 1, 2, ...).
        spec: what the merge does (:class:`~domainmerge.merging.spec.MergeSpec`: the method and its
            knobs, weights, buffer rule, rules ...); default: the paper's linear merge.
        base: the weights the models were adapted from (the task-vector methods and AdaMerging
            take task vectors against it).
        domains: target images for :class:`~domainmerge.merging.spec.Fisher` /
            :class:`~domainmerge.merging.spec.AdaMerging`: ``(name, kind, root, split)`` tuples or
            a mapping name -> dataset (one per model, in order, for Fisher).
        prefix: merge only the network under this wrapper prefix, written without it
            (``'auto'``: ``model.`` when present, else ``module.``, else none).
        dtype: the output's floating dtype (default: the widest input's; accumulation is always
            float32 or wider).
        device: where Fisher / AdaMerging run (default: cuda when available).
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
        >>> report = merge_files([folder / "a.pth", folder / "b.pth"], folder / "w.pth", MergeSpec(weights=[3, 1]))
        >>> load_state_dict(folder / "w.pth")["conv.weight"]
        tensor([1.5000, 1.5000])
    """
    start = time.perf_counter()
    spec = spec if spec is not None else MergeSpec()
    inputs = [Path(p) for p in paths]
    if len(inputs) < 2:
        raise MergeError("give at least two checkpoints to merge")
    if len({p.resolve() for p in inputs}) != len(inputs):
        raise MergeError("the same checkpoint is given twice; use ", Option("weights"), " to weigh a model more")
    spec.check_inputs(len(inputs), has_base=base is not None)
    out_dtype = _torch_dtype(dtype)
    if out_dtype is not None and not out_dtype.is_floating_point:
        raise MergeError(Option("dtype", str(out_dtype).replace("torch.", "")), ": not a floating-point dtype")
    outputs = head_output_paths(out, len(inputs), spec.names) if spec.per_model else [Path(out)]
    read = (*inputs, Path(base)) if base else tuple(inputs)
    for output in outputs:
        output_format(output)
        check_output_path(output, force=force, inputs=read)
    if isinstance(spec.method, Fisher | AdaMerging):
        if prefix is not None or dtype is not None:
            raise MergeError(Option("method", spec.method.name), " writes the whole container as it is: ",
                             Option("prefix"), " and ", Option("dtype"), " do not apply")
        return _merge_with_data(inputs, outputs[0], spec, base=Path(base) if base else None, domains=domains,
                                device=device, trust_pickle=trust_pickle, force=force, progress=progress, log=log,
                                start=start)
    if domains:
        raise MergeError(Option("domains"), f": only read by the methods that use data ({', '.join(DATA_METHODS)})")
    if device is not None:
        raise MergeError(Option("device"), f": only used by the methods that use data ({', '.join(DATA_METHODS)})")

    with contextlib.ExitStack() as stack:
        checkpoints = [stack.enter_context(open_checkpoint(p, trust_pickle=trust_pickle)) for p in inputs]
        base_ck = stack.enter_context(open_checkpoint(base, trust_pickle=trust_pickle)) if base else None
        sources: list[Source] = list(checkpoints)
        if prefix is not None:
            sources = [StrippedSource(ck, prefix) for ck in checkpoints]
        alignment: dict[str, Any] = {}
        if spec.align:
            sources, alignment = _aligned(sources, checkpoints)
        plan = plan_merge(sources, spec, base=base_ck, dtype=out_dtype)
        record = {
            "tool": f"domainmerge {__version__}",
            "inputs": [p.name for p in inputs],
            "weights": plan.weights,
            "buffers": spec.buffers,
            "counts": list(spec.counts) if spec.counts else "num_batches_tracked",
            "keep_heads": spec.keep_heads,
            "only": spec.only,
            "prefix": prefix,
            "dtype": _dtype_names([out_dtype])[0] if out_dtype is not None else "widest input",
            "aligned": spec.align,
            "method": spec.method.name,
            "recipe": spec.record([str(p) for p in inputs], str(base) if base else None),
        }
        _write_streamed(sources, plan, outputs, template=checkpoints[0], record=record, force=force,
                        progress=progress)
        input_dtypes = _dtype_names(i.dtype for ck in checkpoints for i in ck.infos.values())
    return MergeReport(
        inputs=inputs, outputs=outputs, method=spec.method.name, buffers=spec.buffers, weights=plan.weights,
        record=record, tensors={role: n for role, n in plan.stats.items() if role != "bn_layers"},
        bn_layers=plan.stats.get("bn_layers", 0), dtypes=_dtype_names(plan.dtypes.values()),
        input_dtypes=input_dtypes, dtype_given=out_dtype is not None, base=Path(base) if base else None,
        lam=getattr(spec.method, "lam", 1.0), rules=_rule_counts(plan), alignment=alignment,
        seconds=time.perf_counter() - start)


def _rule_counts(plan: MergePlan) -> dict[str, int]:
    """Rule pattern -> how many keys it decided (first match), for the summary."""
    from domainmerge.merging.roles import rule_for

    counts: dict[str, int] = {r.pattern: 0 for r in plan.spec.rules}
    for key in plan.keys:
        rule = rule_for(key, plan.spec.rules)
        if rule is not None:
            counts[rule.pattern] += 1
    return counts


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


def _write_streamed(sources: Sequence[Source], plan: MergePlan, outputs: Sequence[Path], *, template: Checkpoint,
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


def _datasets(domains: Sequence[DomainSpec] | Mapping[str, SegDataset]) -> dict[str, SegDataset]:
    """name -> dataset (images only) of the data-using methods' ``domains``."""
    from domainmerge.data import image_dataset

    if isinstance(domains, Mapping):
        return dict(domains)
    return {name: image_dataset(kind, root, split) for name, kind, root, split in domains}


def _merge_with_data(inputs: list[Path], output: Path, spec: MergeSpec, *, base: Path | None,
                     domains: Sequence[DomainSpec] | Mapping[str, SegDataset] | None, device: str | torch.device | None,
                     trust_pickle: bool, force: bool, progress: bool, log: Callable[[str], None] | None,
                     start: float) -> MergeReport:
    """fisher / adamerging: build the network, read unlabeled target images, merge, write."""
    import json

    from domainmerge.data.sampling import image_batches, spread_indices
    from domainmerge.fsutil import write_text_atomic
    from domainmerge.merging.learned import adamerging, fisher_diagonal, fisher_merge
    from domainmerge.models import StoredNetwork
    from domainmerge.runtime.device import resolve_device

    m = spec.method
    assert isinstance(m, Fisher | AdaMerging)
    method = m.name
    if not domains:
        raise MergeError(Option("method", method), " reads unlabeled target images; give them with ",
                         Option("domains"))
    if method == "fisher" and len(domains) != len(inputs):
        raise MergeError(Option("method", method), " estimates each model's Fisher on its own target: give one ",
                         Option("domains"), f" per model, in the order of the models ({len(inputs)}), "
                         f"got {len(domains)}")
    coef_path = output.with_name(output.stem + ".coefficients.json") if method == "adamerging" else None
    if coef_path is not None:
        check_output_path(coef_path, force=force, inputs=tuple(inputs))
    run_on = device or resolve_device(None)
    datasets = _datasets(domains)
    indices = spread_indices({n: len(ds) for n, ds in datasets.items()}, m.images)

    def batches(name: str) -> list[torch.Tensor]:
        return list(image_batches(datasets, {name: indices[name]}, batch_size=m.batch_size))

    with contextlib.ExitStack() as stack:
        # Every input's network under the first input's wrapper prefix; the output is the first
        # input's container with its network replaced.
        first = stack.enter_context(StoredNetwork.open(inputs[0], trust_pickle=trust_pickle))
        stored = [first, *(stack.enter_context(StoredNetwork.open(p, prefix=first.prefix, trust_pickle=trust_pickle))
                           for p in inputs[1:])]
        nets = [s.state_dict() for s in stored]
        model = first.build(state_dict=nets[0])
        if log is not None:
            log(f"method {method} READS TARGET IMAGES: " + ", ".join(f"{d} {len(v)}" for d, v in indices.items()))
        extra: dict[str, Any] = {}
        if isinstance(m, Fisher):
            fishers = [fisher_diagonal(model, sd, batches(name), device=run_on) for sd, name in zip(nets, datasets)]
            merged = fisher_merge(nets, fishers, spec.weights, buffers=spec.buffers, counts=spec.counts)
        else:
            assert base is not None
            base_net = stack.enter_context(StoredNetwork.open(base, trust_pickle=trust_pickle)).state_dict()
            result = adamerging(model, nets, base_net, [batches(n) for n in datasets], weights=spec.weights,
                                granularity=m.granularity, steps=m.steps, lr=m.lr, buffers=spec.buffers,
                                device=run_on, progress=progress)
            merged = result.state_dict
            extra = {"granularity": m.granularity, "steps": m.steps, "lr": m.lr, "base": base.name,
                     "entropy": [result.entropy[0], result.entropy[-1]] if result.entropy else []}
        record = {"tool": f"domainmerge {__version__}", "inputs": [p.name for p in inputs], "method": method,
                  "buffers": spec.buffers, "uses_target_data": True,
                  "images": {d: len(v) for d, v in indices.items()}, **extra}
        if coef_path is not None:
            write_text_atomic(coef_path, json.dumps({"models": record["inputs"], "granularity": extra["granularity"],
                                                     "coefficients": result.coefficients,
                                                     "entropy": result.entropy}, indent=1))
        first.save(output, merged, record=record, stored_dtypes=False, force=force, inputs=inputs)
    return MergeReport(inputs=inputs, outputs=[output], method=method, buffers=spec.buffers,
                       weights=spec.check_inputs(len(inputs), base is not None), record=record,
                       base=base, images=record["images"], coefficients=coef_path,
                       seconds=time.perf_counter() - start)


def merge_recipe_files(recipe: Any, out: PathLike, *, prefix: str | None = None,
                       dtype: torch.dtype | str | None = None, trust_pickle: bool = False, force: bool = False,
                       progress: bool = False) -> MergeReport:
    """:func:`merge_files` as a recipe says (the library behind ``domainmerge merge --config``).
    The output records the same recipe as the equal call of :func:`merge_files`.

    Args:
        recipe: a :class:`~domainmerge.merging.recipe.MergeRecipe` or the path of a YAML (or
            JSON) recipe (:mod:`domainmerge.merging.recipe`: models, weights, base, method and
            knobs, buffers, per-module rules).
        out: the output file; prefix, dtype, trust_pickle, force, progress: the file options a
            recipe does not hold, as :func:`merge_files` takes them.

    Returns:
        The :class:`MergeReport`.

    Example:
        >>> import tempfile, torch
        >>> from domainmerge import load_state_dict, merge_recipe_files, save_checkpoint
        >>> folder = Path(tempfile.mkdtemp())
        >>> for name, value in (("a", 0.0), ("b", 4.0)):
        ...     _ = save_checkpoint(folder / f"{name}.pth", {"conv.weight": torch.full((2,), value)})
        >>> _ = (folder / "recipe.yaml").write_text("models: [{path: a.pth, weight: 3}, b.pth]")
        >>> report = merge_recipe_files(folder / "recipe.yaml", folder / "merged.pth")
        >>> load_state_dict(folder / "merged.pth")["conv.weight"], report.method
        (tensor([1., 1.]), 'linear')
    """
    from domainmerge.merging.recipe import MergeRecipe, load_recipe

    r = recipe if isinstance(recipe, MergeRecipe) else load_recipe(recipe)
    return merge_files(r.models, out, r.spec, base=r.base, prefix=prefix, dtype=dtype, trust_pickle=trust_pickle,
                       force=force, progress=progress)
