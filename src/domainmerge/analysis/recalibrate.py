"""BatchNorm recalibration: re-estimate running statistics from unlabeled images.

The data-driven baseline the paper avoids (REPAIR's "reset"): every BN layer's running
statistics are reset and re-accumulated as a cumulative average (``momentum=None``) over the
given batches, forwarded with the BN layers in training mode and everything else in eval mode
(dropout off), without gradients. PyTorch's rule then gives, for B batches,
running_mean = mean_b(batch mean_b), running_var = mean_b(unbiased batch var_b),
num_batches_tracked = B. Only BN buffers change.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from domainmerge.errors import Option, UserError

_BatchNorm = nn.modules.batchnorm._BatchNorm


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The model's BN layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Tensor], *, device: str | torch.device = "cpu",
                   progress: bool = False, total: int | None = None) -> int:
    """Reset and re-estimate ``model``'s BN running statistics from normalised float batches
    [B, 3, H, W]; returns the number of batches. The model is left in eval mode. ``total``: the
    number of images the batches hold, for the progress bar (counted in images)."""
    layers = batchnorm_layers(model)
    if not layers:
        raise UserError("the model has no BatchNorm layer with running statistics; nothing to recalibrate")
    model.to(device).eval()
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches, not an exponential one
        m.train()
    from tqdm import tqdm

    count = 0
    bar = tqdm(total=total, desc="recalibrate BN", unit="img", disable=not progress)
    try:
        for x in batches:
            try:
                model(x.to(device))
            except ValueError as exc:  # BN after global pooling cannot normalise a batch of one
                raise UserError(f"BatchNorm in training mode failed on a batch of {len(x)}: {exc}; use ",
                                Option("batch_size", 2), " or more") from None
            count += 1
            bar.update(len(x))
    finally:
        bar.close()
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.eval()
    if count == 0:
        raise UserError("no image to recalibrate on; check the folders of ", Option("domains"), " and ",
                        Option("images"))
    return count


@dataclass
class RecalibrationReport:
    """What :func:`recalibrate_file` wrote: the output, images read per domain, batches
    forwarded, and the image scale used per domain (None: native)."""

    output: Path
    images: dict[str, int]
    batches: int
    scales: dict[str, tuple[int, int] | None]

    @property
    def total_images(self) -> int:
        return sum(self.images.values())


def recalibrate_file(checkpoint: str | os.PathLike[str], output: str | os.PathLike[str], *,
                     domains: Sequence[tuple[str, str, str, str]], images: int, batch_size: int = 1,
                     protocol: str | None = None, img_scale: tuple[int, int] | None = None, arch: str = "auto",
                     prefix: str = "auto", device: str | torch.device = "cpu", trust_pickle: bool = False,
                     strict: bool = True, force: bool = False, progress: bool = False,
                     log: Callable[[str], None] | None = None) -> RecalibrationReport:
    """Re-estimate a checkpoint's BatchNorm statistics from unlabeled images and write it to
    ``output`` in the same container (other tensors unchanged, the record extended).

    Args:
        checkpoint: the (merged) checkpoint file.
        output: the output file (checked before any image is read; written atomically).
        domains: ``(name, dataset kind, root, split)`` of the image folders.
        images: images over all domains, spread evenly (:func:`domainmerge.data.sampling.spread_indices`).
        batch_size: images per forward (equal-size images only).
        protocol, img_scale: the image scale evaluation would use per domain
            (:func:`domainmerge.evaluation.protocols.resolve`).
        arch, prefix: the network in the checkpoint (``'auto'``: detected / ``model.`` when
            present, else ``module.``, else none); keys outside the prefix are copied.
        device, trust_pickle, strict, force: where to run; full unpickling; refuse unreadable
            dataset files; replace an existing output.
        progress: show a progress bar; ``log``: called with a line on what is read, before.

    Returns:
        A :class:`RecalibrationReport`.

    Example:
        >>> import os, tempfile, torch
        >>> from domainmerge import build_model, load_state_dict, recalibrate_file, save_checkpoint
        >>> folder = tempfile.mkdtemp()
        >>> path = save_checkpoint(os.path.join(folder, "merged.pth"), build_model("tiny_daformer_r").state_dict())
        >>> from domainmerge.data import register_dataset
        >>> from domainmerge.data.synthetic import SyntheticDataset
        >>> register_dataset("small", lambda root, split, strict=True: SyntheticDataset(root, split, 4, size=(32, 64)),
        ...                  overwrite=True)   # a dataset kind for the example: 4 synthetic scenes of 32x64
        >>> report = recalibrate_file(path, os.path.join(folder, "recal.pth"), images=4, batch_size=2,
        ...                           domains=[("city", "small", "city", "train")])
        >>> report.images, report.batches
        ({'city': 4}, 2)
        >>> float(load_state_dict(report.output)["backbone.stem.1.num_batches_tracked"])
        2.0
    """
    from domainmerge.data import SegDataset, image_dataset
    from domainmerge.data.sampling import image_batches, spread_indices
    from domainmerge.evaluation.protocols import family_of, resolve
    from domainmerge.fsutil import check_output_path
    from domainmerge.models import StoredNetwork
    from domainmerge.tensors import nonfinite_keys, nonfinite_message

    if batch_size < 1:
        raise UserError(Option("batch_size", batch_size), ": must be at least 1")
    check_output_path(output, force=force, inputs=(checkpoint,))
    datasets: dict[str, SegDataset] = {name: image_dataset(kind, root, split, strict=strict)
                                for name, kind, root, split in domains}
    indices = spread_indices({name: len(ds) for name, ds in datasets.items()}, images)
    with StoredNetwork.open(checkpoint, prefix=prefix, trust_pickle=trust_pickle) as stored:
        net = stored.state_dict()
        # Statistics are re-estimated, so NaN there is repaired; NaN in weights would only spread into them.
        bad = [k for k in nonfinite_keys(net) if not k.endswith(("running_mean", "running_var"))]
        if bad:
            raise UserError(nonfinite_message(str(checkpoint), bad), "; recalibrating BatchNorm statistics cannot "
                            "repair it")
        model = stored.build(arch, net)
        family = family_of(stored.spec(arch, net))
        scales = {name: resolve(family, kind, protocol, img_scale=img_scale).img_scale
                  for name, kind, _, _ in domains}
        n_images = sum(len(v) for v in indices.values())
        if log is not None:
            log(f"recalibrating BN statistics on {n_images} images: "
                + ", ".join(f"{d} {len(v)}" for d, v in indices.items()))
            log("image scale: " + ", ".join(f"{d} {'x'.join(map(str, s)) if s else 'native'}"
                                            for d, s in scales.items()))
        batches = recalibrate_bn(model, image_batches(datasets, indices, batch_size=batch_size, img_scale=scales),
                                 device=device, progress=progress, total=n_images)
        bad = nonfinite_keys(model.state_dict())
        if bad:
            raise UserError(f"recalibration gave NaN or infinite statistics (e.g. {bad[0]!r}); {output} is not "
                            "written: check the images and the network")
        record = stored.updated_record(recalibrated={"images": n_images, "batches": batches,
                                                     "domains": {d: len(v) for d, v in indices.items()}})
        written = stored.save(output, model.state_dict(), record=record, force=force)
    return RecalibrationReport(written, {d: len(v) for d, v in indices.items()}, batches, scales)
