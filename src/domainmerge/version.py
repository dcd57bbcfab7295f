"""The package version (kept here, below every layer, so any module may print it)."""

__version__ = "0.1.0"
