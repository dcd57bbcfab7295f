"""The command line as a whole: every subcommand's help renders, and `python -m domainmerge` works."""

import subprocess
import sys

import pytest

from domainmerge.cli import main

SUBCOMMANDS = ["merge", "inspect", "score", "convert-labels", "align", "evaluate", "recalibrate", "lmc", "demo"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_renders_without_format_escapes(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: domainmerge {command}" in out
    assert "%%" not in out and "%(" not in out  # a literal escape means argparse did not format it


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in SUBCOMMANDS)


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "domainmerge", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().startswith("domainmerge ")
