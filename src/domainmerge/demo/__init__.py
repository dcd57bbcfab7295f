"""The paper end to end in the built-in synthetic world (``domainmerge demo``).

``pipeline``: the stages (world, pretraining, source-only, STDA per target, data combination,
different initialisation, merges, evaluation, interpolation) and the claims' checks;
``report``: results.md and the plots.
"""

from domainmerge.demo.pipeline import PRESETS, Demo, Preset, evaluate, parse_targets, preset_with, run_demo
from domainmerge.demo.report import plot, render_markdown

__all__ = ["PRESETS", "Demo", "Preset", "evaluate", "parse_targets", "plot", "preset_with", "render_markdown",
           "run_demo"]
