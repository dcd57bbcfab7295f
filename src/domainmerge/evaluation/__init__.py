"""domainmerge.evaluation: the field's segmentation metric, means over domains, inference and test
protocols; ``bootstrap``: confidence intervals over images.

``evaluate_model`` is the package's public face to its siblings: training validates through it
(docs/CONTRACTS.md, "Layers"), importing it from here, never from a module of this package.
"""

from domainmerge.evaluation.inference import evaluate_model
from domainmerge.evaluation.metrics import (
    ImageStats,
    SegMetric,
    SegScores,
    arithmetic_mean,
    harmonic_mean,
    scores_from_confusion,
)

__all__ = ["ImageStats", "SegMetric", "SegScores", "arithmetic_mean", "evaluate_model", "harmonic_mean",
           "scores_from_confusion"]
