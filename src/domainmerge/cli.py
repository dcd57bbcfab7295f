"""The `domainmerge` command line: a thin dispatcher over `domainmerge.commands.*`.

Each subcommand lives in its own module with ``add_parser(subparsers)`` (which sets
``func``) and imports heavy dependencies lazily so `domainmerge --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Sequence

from domainmerge.errors import Terminated, UserError, command_messages, killed_worker_signal
from domainmerge.version import __version__

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


def command_flags(args: argparse.Namespace) -> dict[str, str]:
    """The command's own flag names for library options (its module's ``FLAGS``, e.g.
    ``{'lam': '--lambda'}``): a library error names an option as a Python keyword, the command
    line names the flag that sets it."""
    func = getattr(args, "func", None)
    module = sys.modules.get(getattr(func, "__module__", ""), None)
    # --domain (commands._common) sets the library's ``domains`` in every command that has it.
    return {"domains": "--domain", **getattr(module, "FLAGS", {})}


def close_progress_bars() -> None:
    """Close the progress bars an exception left open: an open bar redraws itself when it is
    closed or collected, after the error message, which must be the last line a user sees."""
    std = sys.modules.get("tqdm.std")   # tqdm never imported: no bar to close
    if std is None:
        return
    for bar in list(getattr(std.tqdm, "_instances", ())):
        with contextlib.suppress(Exception):
            bar.leave = False   # cleared, not redrawn
            bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status: 2 for user errors, 130 on Ctrl-C (SIGINT),
    143 on SIGTERM; in both cases temporary files of unfinished outputs are removed."""
    from domainmerge.fsutil import handle_termination

    parser = build_parser()
    args = parser.parse_args(argv)
    flags = command_flags(args)
    try:
        with handle_termination(), command_messages(flags):
            status = args.func(args)
    except UserError as exc:
        close_progress_bars()
        print(f"domainmerge {args.command}: error: {exc.for_command(flags)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        close_progress_bars()
        print("domainmerge: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        close_progress_bars()
        print("domainmerge: terminated", file=sys.stderr)
        return 128 + exc.signum
    except RuntimeError as exc:
        # The signal reached the DataLoader workers too and torch noticed their death first.
        signum = killed_worker_signal(exc)
        if signum is None:
            raise
        close_progress_bars()
        print("domainmerge: " + ("interrupted" if signum == 2 else "terminated"), file=sys.stderr)
        return 128 + signum
    return int(status or 0)


def run() -> None:
    """The console entry point: :func:`main`, then exit with its status. Once the command is done,
    SIGINT and SIGTERM are ignored: every output is complete by then, and a signal arriving during
    the interpreter's shutdown would otherwise print a traceback from an exit handler."""
    import signal

    status = main()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(status)
