"""The import layers of docs/CONTRACTS.md ("Layers"): no module imports a higher layer, no cycle.

Every module under src/domainmerge is parsed with ``ast``; every ``import`` and ``from ... import``
counts, also those inside functions and under ``if TYPE_CHECKING`` (a local import hides a
dependency from the interpreter's start-up, not from the design).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "domainmerge"

# Lowest first. A module may import its own unit's modules and those of lower layers; units of one
# layer do not import each other. A unit is a top-level module or package of domainmerge, or a
# module given its own row ('package.module': it then leaves its package's layer). Keep in step
# with docs/CONTRACTS.md and docs/ARCHITECTURE.md.
LAYERS: tuple[tuple[str, ...], ...] = (
    # foundations: no domain knowledge
    ("errors", "version"),
    ("fsutil",),
    ("runtime", "data.classes"),   # data.classes: the label set and MEAN/STD, constants only
    ("tensors",),
    ("checkpoint",),
    ("reporting",),
    # shared domain layer
    ("data", "models", "alignment"),
    # the siblings: phase 1, phase 2, scoring
    ("training", "merging", "evaluation"),
    # studies combining them: interpolation/LMC, BN recalibration
    ("analysis",),
    ("demo",),
    ("commands",),
    ("cli", ""),       # "": the package itself (domainmerge/__init__.py, the public API)
    ("__main__",),     # python -m domainmerge
)
# The documented exceptions between units of one layer: (importer, imported module). Only a
# package's own face (its __init__), never one of its modules: training validates through
# domainmerge.evaluation's evaluate_model.
SIBLING_API = {("training", "domainmerge.evaluation")}
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def module_files() -> dict[str, Path]:
    """'domainmerge.evaluation.lmc' -> its file, for every module of the package."""
    out = {}
    for path in SRC.rglob("*.py"):
        parts = ["domainmerge", *path.relative_to(SRC).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The domainmerge modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "domainmerge"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "domainmerge":
                continue
            subs = {f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known}
            out |= subs if subs and len(subs) == len(node.names) else {module} | subs
    return out - {name}


def unit(module: str) -> str:
    """The layer unit of a module: the longest entry of LAYERS that is the module or one of its
    packages (e.g. 'evaluation', or a module given its own row such as 'merging.files'); the
    top-level package or module under domainmerge otherwise ('' for the root)."""
    parts = module.split(".")[1:]
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANK:
            return ".".join(parts[:n])
    return parts[0] if parts else ""


def graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imported(name, path, known) for name, path in files.items()}


def test_every_module_has_a_layer() -> None:
    missing = sorted({unit(m) for m in module_files()} - set(RANK))
    assert not missing, f"add these to LAYERS here and in docs/CONTRACTS.md: {missing}"


def test_no_module_imports_a_higher_layer() -> None:
    upward = upward_imports(graph())
    assert not upward, "\n".join(upward)


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    """One line per import of a module in the same or a higher layer than the importer's unit."""
    upward = []
    for module, targets in edges.items():
        for target in targets:
            a, b = unit(module), unit(target)
            if a != b and RANK[b] >= RANK[a] and (a, target) not in SIBLING_API:
                upward.append(f"{module} imports {target} ({a or 'domainmerge'} is layer {RANK[a]}, "
                              f"{b or 'domainmerge'} layer {RANK[b]})")
    return sorted(upward)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_modules() -> None:
    # A package's __init__ re-exporting its own modules is not a cycle of the design: importing a
    # submodule always runs its package's __init__ first.
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph().items()}
    assert cycles(edges) == []


@pytest.mark.parametrize("source, expected", [
    ("import domainmerge.evaluation.lmc", {"domainmerge.evaluation.lmc"}),
    ("def f():\n    from domainmerge.reporting import fmt", {"domainmerge.reporting"}),
    ("from domainmerge.evaluation import lmc, distributed", {"domainmerge.evaluation.lmc",
                                                            "domainmerge.evaluation.distributed"}),
    ("from . import lmc", {"domainmerge.evaluation.lmc"}),
    ("from ..reporting import fmt", {"domainmerge.reporting"}),
])
def test_imports_are_read_from_the_source(tmp_path: Path, source: str, expected: set[str]) -> None:
    path = tmp_path / "inference.py"
    path.write_text(source)
    known = {"domainmerge.evaluation.lmc", "domainmerge.evaluation.distributed", "domainmerge.reporting"}
    assert imported("domainmerge.evaluation.inference", path, known) == expected


def test_an_upward_import_and_a_cycle_are_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    # reporting importing evaluation is upward; evaluation importing reporting, and a module
    # importing its own unit, are not
    made_up = {"domainmerge.reporting": {"domainmerge.evaluation.lmc"},
               "domainmerge.evaluation.lmc": {"domainmerge.reporting", "domainmerge.evaluation.metrics"}}
    assert [line.split(" (")[0] for line in upward_imports(made_up)] == [
        "domainmerge.reporting imports domainmerge.evaluation.lmc"]
    assert RANK["reporting"] < RANK["evaluation"] < RANK["demo"]
    assert unit("domainmerge.evaluation.lmc") == "evaluation" and unit("domainmerge") == ""
    assert unit("domainmerge.reporting") == "reporting"


def test_siblings_meet_only_through_the_documented_face() -> None:
    # training may import domainmerge.evaluation (its __init__), not evaluation's modules; the
    # siblings merging and evaluation may not import each other at all
    assert upward_imports({"domainmerge.training.adapt": {"domainmerge.evaluation"}}) == []
    assert len(upward_imports({"domainmerge.training.adapt": {"domainmerge.evaluation.inference"}})) == 1
    assert len(upward_imports({"domainmerge.evaluation.checkpoints": {"domainmerge.merging.engine"}})) == 1
    assert len(upward_imports({"domainmerge.merging.files": {"domainmerge.evaluation"}})) == 1
    assert RANK["training"] == RANK["merging"] == RANK["evaluation"] < RANK["analysis"]
