"""The examples in the library's docstrings run as written (the public API of ``domainmerge``
and the modules that define it; domainmerge.merging.files and evaluation.folders: test_merge_files)."""

from __future__ import annotations

import doctest
import importlib
import inspect

import pytest

MODULES = [
    "domainmerge",
    "domainmerge.checkpoint.reading",
    "domainmerge.checkpoint.prefixes",
    "domainmerge.checkpoint.writing",
    "domainmerge.merging.engine",
    "domainmerge.merging.recipe",
    "domainmerge.merging.spec",
    "domainmerge.models.registry",
    "domainmerge.models.detect",
    "domainmerge.models.stored",
    "domainmerge.alignment.matching",
    "domainmerge.data.readers",
    "domainmerge.evaluation.inference",
    "domainmerge.tensors",
    # every command's back end (the public API)
    "domainmerge.training.adapt",
    "domainmerge.training.recipe",
    "domainmerge.evaluation.checkpoints",
    "domainmerge.analysis.interpolation",
    "domainmerge.analysis.recalibrate",
    "domainmerge.merging.inspection",
    "domainmerge.data.convert",
    "domainmerge.demo.pipeline",
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


def _public_functions() -> list[str]:
    import domainmerge

    return sorted(name for name in domainmerge._API if inspect.isfunction(getattr(domainmerge, name)))


# Every public function's docstring follows the Args / Returns / Example layout (PEP 257 + doctest),
# so a new public function without it fails here.
STRUCTURED = _public_functions()


def test_structured_lists_the_public_functions_not_the_classes() -> None:
    # the list is computed; this pins that it found the functions (not the classes) of the API
    assert {"load_state_dict", "merge_state_dicts", "evaluate_model", "harmonic_mean"} <= set(STRUCTURED)
    assert "DomainScores" not in STRUCTURED and "MergeReport" not in STRUCTURED


@pytest.mark.parametrize("name", STRUCTURED)
def test_public_function_docstrings_have_args_returns_and_an_example(name: str) -> None:
    import domainmerge

    doc = getattr(domainmerge, name).__doc__ or ""
    for section in ("Args:", "Returns:", "Example:", ">>> "):
        assert section in doc, f"domainmerge.{name}: no {section!r} in its docstring"
