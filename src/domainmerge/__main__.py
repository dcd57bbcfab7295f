"""`python -m domainmerge` is the same as the `domainmerge` command."""

from domainmerge.cli import run

run()
