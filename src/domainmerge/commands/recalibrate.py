"""`domainmerge recalibrate`: re-estimate a merged model's BN statistics from unlabeled images."""

from __future__ import annotations

import argparse
from typing import Any

from domainmerge.commands._common import (
    add_domain_argument,
    add_network_options,
    add_protocol_options,
    parse_domains,
    resolve_device,
    resolve_protocol,
)
from domainmerge.errors import UserError

DESCRIPTION = """\
Re-estimate the BatchNorm running statistics of a (merged) checkpoint from N unlabeled images
spread evenly over the given domains: statistics are reset and accumulated as a cumulative
average (momentum None) with BN layers in training mode, without gradients; nothing else
changes. This uses target data, unlike the training-free Gaussian merge of BN statistics: use
it as the data-driven reference to compare against.
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("recalibrate", help="re-estimate BN statistics from unlabeled images (uses data)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="MERGED", help="checkpoint whose BN statistics to re-estimate")
    add_domain_argument(p, "images to use", default_split="train")
    p.add_argument("--images", type=int, required=True, metavar="N", help="number of images over all domains")
    p.add_argument("-o", "--output", required=True, help="output checkpoint (same container as the input)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images per forward pass (equal-size images only; default 1)")
    add_protocol_options(p, windows=False)  # the image scale evaluate would use (--protocol / --img-scale)
    add_network_options(p, prefix_note="; other keys are copied unchanged")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-strict", action="store_true", help="skip unpaired or unreadable dataset files")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from domainmerge.checkpoint import (
        detect_prefixes,
        open_checkpoint,
        save_checkpoint,
        strip_model_prefix,
        updated_record,
    )
    from domainmerge.data import LAYOUTS, build_dataset
    from domainmerge.evaluation.protocols import family_of
    from domainmerge.evaluation.recalibrate import image_batches, recalibrate_bn, spread_indices
    from domainmerge.fsutil import check_output_path
    from domainmerge.models import model_from_state_dict, resolve_spec

    domains = parse_domains(args.domain, "train")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    check_output_path(args.output, force=args.force, inputs=(args.checkpoint,))
    device = resolve_device(args.device)
    # Images only: the readers that can skip labels do, so unlabeled training splits work too.
    datasets: dict[str, Any] = {
        name: build_dataset(kind, root, split, strict=not args.no_strict,
                            **({"labels": False} if kind in LAYOUTS or kind == "folder" else {}))
        for name, kind, root, split in domains}
    indices = spread_indices({name: len(ds) for name, ds in datasets.items()}, args.images)
    with open_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle) as ck:
        full = ck.state_dict()
        prefix = args.prefix
        if prefix == "auto":
            found = detect_prefixes(full)
            prefix = "model." if "model." in found else ("module." if "module." in found else "")
        net = strip_model_prefix(full, prefix)
        model = model_from_state_dict(net, args.arch)
        family = family_of(resolve_spec(net, args.arch))
        scales = {name: resolve_protocol(args, family, kind).img_scale for name, kind, _, _ in domains}
        n_images = sum(len(v) for v in indices.values())
        if not args.quiet:
            print(f"recalibrating BN statistics on {n_images} images: "
                  + ", ".join(f"{d} {len(v)}" for d, v in indices.items()), flush=True)
            print("image scale: " + ", ".join(f"{d} {'x'.join(map(str, s)) if s else 'native'}"
                                              for d, s in scales.items()), flush=True)
        batches = recalibrate_bn(model, image_batches(datasets, indices, batch_size=args.batch_size,
                                                      img_scale=scales),
                                 device=device, progress=not args.quiet, total=n_images)
        out = dict(full)
        for key, value in model.state_dict().items():
            original = full[prefix + key]
            out[prefix + key] = value.detach().to("cpu", original.dtype)
        record = updated_record(ck, recalibrated={"images": n_images, "batches": batches,
                                                  "domains": {d: len(v) for d, v in indices.items()}})
        save_checkpoint(args.output, out, template=ck, record=record, force=args.force, inputs=(args.checkpoint,))
    print(f"wrote {args.output} ({n_images} images, {batches} batches)")
    return 0
