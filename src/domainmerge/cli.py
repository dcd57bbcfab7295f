"""The `domainmerge` command line: a thin dispatcher over `domainmerge.commands.*`.

Each subcommand lives in its own module with ``add_parser(subparsers)`` (which sets
``func``) and imports heavy dependencies lazily so `domainmerge --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from domainmerge import __version__
from domainmerge.errors import UserError

# Order is the order of `domainmerge --help`.
COMMANDS = [
    "merge",
    "inspect",
    "score",
    "convert_labels",
    "adapt",
    "align",
    "evaluate",
    "recalibrate",
    "lmc",
    "demo",
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="domainmerge",
        description="Merge domain-adapted segmentation networks without data, and evaluate them.",
    )
    parser.add_argument("--version", action="version", version=f"domainmerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"domainmerge.commands.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (2 for user errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except UserError as exc:
        print(f"domainmerge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("domainmerge: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)
