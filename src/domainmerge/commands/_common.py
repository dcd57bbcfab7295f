"""Options shared by the commands that read datasets (evaluate, lmc, recalibrate)."""

from __future__ import annotations

import argparse

from domainmerge.errors import UserError


def add_domain_argument(p: argparse.ArgumentParser, help_text: str) -> None:
    """The repeatable ``--domain NAME DATASET ROOT [SPLIT]`` option."""
    p.add_argument("--domain", nargs="+", action="append", default=[], metavar="NAME DATASET ROOT [SPLIT]",
                   help=help_text)


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
