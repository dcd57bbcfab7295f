"""The paper end to end in the built-in synthetic world (``domainmerge demo``).

``pipeline``: the stages (world, pretraining, source-only, STDA per target, data combination,
different initialisation, merges, evaluation, interpolation) and the claims' checks;
``claims``: the checks judged from bootstrap intervals; ``records``: the typed results
(``DemoResults``) and the model names; ``seeds``: several seeds summarised; ``report``:
results.md and the plots.
"""

from domainmerge.demo.claims import ALL_CHECKS
from domainmerge.demo.pipeline import (
    PRESETS,
    Demo,
    Preset,
    evaluate,
    image_stats,
    parse_targets,
    preset_with,
    run_demo,
)
from domainmerge.demo.records import DemoResults
from domainmerge.demo.report import plot, render_markdown
from domainmerge.demo.seeds import run_seeds

__all__ = ["ALL_CHECKS", "PRESETS", "Demo", "DemoResults", "Preset", "evaluate", "image_stats", "parse_targets", "plot",
           "preset_with", "render_markdown", "run_demo", "run_seeds"]
