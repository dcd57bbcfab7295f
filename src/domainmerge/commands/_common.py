"""Options shared by the commands that run a network on datasets (evaluate, lmc, recalibrate)."""

from __future__ import annotations

import argparse
from typing import Any

from domainmerge.errors import UserError


def add_domain_argument(p: argparse.ArgumentParser, purpose: str = "a domain to score on",
                        default_split: str = "val") -> None:
    """The repeatable ``--domain NAME DATASET ROOT [SPLIT]`` option."""
    p.add_argument("--domain", nargs="+", action="append", default=[], metavar="NAME DATASET ROOT [SPLIT]",
                   help=f"{purpose}: its name, dataset kind (cityscapes, idd, acdc, darkzurich, gta, folder, "
                        f"synthetic), root folder and split (default {default_split}); repeatable")


def parse_domains(specs: list[list[str]], default_split: str) -> list[tuple[str, str, str, str]]:
    """``--domain`` values -> (name, dataset kind, root, split); names must be unique."""
    out = []
    for spec in specs:
        if len(spec) not in (3, 4):
            raise UserError(f"--domain {' '.join(spec)}: give NAME DATASET ROOT [SPLIT]")
        out.append((spec[0], spec[1], spec[2], spec[3] if len(spec) == 4 else default_split))
    if not out:
        raise UserError("no domain given; add --domain NAME DATASET ROOT [SPLIT]")
    names = [d[0] for d in out]
    if len(set(names)) != len(names):
        raise UserError(f"--domain: names must differ, got {names}")
    return out


def add_network_options(p: argparse.ArgumentParser, prefix_note: str = "") -> None:
    """``--arch``, ``--prefix`` and ``--trust-pickle``: which network a checkpoint holds."""
    p.add_argument("--arch", default="auto", help="architecture name, or auto (default) to detect it")
    p.add_argument("--prefix", default="auto",
                   help="key prefix of the network to take (auto: model. if present, else module., else none)"
                        + prefix_note)
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow full unpickling of .pth files (only for files you trust)")


def add_inference_options(p: argparse.ArgumentParser) -> None:
    """How images go through the network: mode, windows, scale, device, batching, precision, loading."""
    add_protocol_options(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass (default: from the image size and device, about a megapixel "
                        "per batch on CPU; only images of equal size share a batch; slide windows: see --max-windows)")
    p.add_argument("--amp", choices=["fp16", "bf16"], help="mixed precision for the forward pass")
    p.add_argument("--workers", type=int, default=None,
                   help="data loading processes (default: 0 for in-memory datasets such as synthetic, else 2)")
    p.add_argument("--num-classes", type=int, default=19, help="number of classes (default 19)")
    p.add_argument("--no-strict", action="store_true", help="skip unpaired or unreadable dataset files")


def add_protocol_options(p: argparse.ArgumentParser, *, windows: bool = True) -> None:
    """``--protocol`` and the explicit settings it stands for (``--mode/--crop/--stride`` when
    ``windows``, and ``--img-scale``). The explicit ones default to None so that
    :func:`protocols.resolve` can tell a given option from a default."""
    p.add_argument("--protocol", choices=["authors", "mtda", "custom"],
                   help="test settings: authors (default when the network family and dataset kind are known: the "
                        "reference code's single-target test config), mtda (Model-Merging-MTDA's multi-target test "
                        "configs) or custom (--mode/--crop/--stride/--img-scale; implied by any of them)")
    if windows:
        p.add_argument("--mode", choices=["whole", "slide"], help="whole image or sliding window (custom)")
        p.add_argument("--crop", nargs=2, type=int, metavar=("H", "W"),
                       help="sliding window size (custom; default 1024 1024)")
        p.add_argument("--stride", nargs=2, type=int, metavar=("H", "W"),
                       help="sliding window stride, at most --crop (custom; default half of --crop: 512 512)")
        p.add_argument("--max-windows", type=int, metavar="N",
                       help="slide mode: at most N windows per forward pass (default: all windows of the batch in "
                            "one forward, as the authors' batched_slide; lower it if memory runs out)")
    p.add_argument("--img-scale", nargs=2, type=int, metavar=("LONG", "SHORT"),
                   help="rescale images keeping their aspect ratio to fit LONG x SHORT (mmseg Resize of the uint8 "
                        "image; custom); logits are resized back to the label size")


def protocol_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``--protocol`` and the explicit settings :func:`add_protocol_options` defined, as the
    keyword arguments of the library's evaluation functions (``protocol``, ``img_scale`` and,
    with windows, ``mode``, ``crop``, ``stride``, ``max_windows``; see ``protocols.resolve``)."""
    def pair(name: str) -> tuple[int, int] | None:
        v = getattr(args, name, None)
        return (int(v[0]), int(v[1])) if v else None

    out: dict[str, Any] = {"protocol": args.protocol, "img_scale": pair("img_scale")}
    if hasattr(args, "mode"):
        out.update(mode=args.mode, crop=pair("crop"), stride=pair("stride"), max_windows=args.max_windows)
    return out
