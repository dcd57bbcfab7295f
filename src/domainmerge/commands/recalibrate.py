"""`domainmerge recalibrate`: re-estimate a merged model's BN statistics from unlabeled images."""

from __future__ import annotations

import argparse
from typing import Any

from domainmerge.commands._common import (
    add_domain_argument,
    add_network_options,
    add_protocol_options,
    parse_domains,
    protocol_settings,
)

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
    """Parse, recalibrate with :func:`domainmerge.analysis.recalibrate.recalibrate_file`, print."""
    from domainmerge.analysis.recalibrate import recalibrate_file
    from domainmerge.runtime.device import resolve_device

    domains = parse_domains(args.domain, "train")
    report = recalibrate_file(
        args.checkpoint, args.output, domains=domains, images=args.images, batch_size=args.batch_size,
        **protocol_settings(args), arch=args.arch, prefix=args.prefix,
        device=resolve_device(args.device), trust_pickle=args.trust_pickle, strict=not args.no_strict,
        force=args.force, progress=not args.quiet, log=None if args.quiet else lambda line: print(line, flush=True))
    print(f"wrote {args.output} ({report.total_images} images, {report.batches} batches)")
    return 0
