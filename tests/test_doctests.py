"""The examples in the library's docstrings run as written (the public API of ``domainmerge``
and the modules that define it)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "domainmerge",
    "domainmerge.merging.engine",
    "domainmerge.merging.recipe",
    "domainmerge.models.registry",
    "domainmerge.models.detect",
    "domainmerge.alignment.matching",
    "domainmerge.data.readers",
    "domainmerge.evaluation.inference",
    "domainmerge.tensors",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), verbose=False)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0


def test_every_public_name_is_importable_and_documented() -> None:
    import domainmerge

    assert set(domainmerge.__all__) == {"UserError", "__version__", *domainmerge._API}
    for name in domainmerge.__all__:
        value = getattr(domainmerge, name)
        assert (value.__doc__ or "").strip(), f"domainmerge.{name} has no docstring"
