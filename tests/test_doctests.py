"""The examples in the library's docstrings run as written."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["domainmerge.merging.engine", "domainmerge.merging.recipe"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), verbose=False)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0
