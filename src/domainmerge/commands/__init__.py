"""Subcommands of the `domainmerge` command line, one module each."""
