"""domainmerge.evaluation: the field's segmentation metric, means over domains, distributed helpers;
``bootstrap``: confidence intervals over images."""

from domainmerge.evaluation.metrics import (
    ImageStats,
    SegMetric,
    SegScores,
    arithmetic_mean,
    harmonic_mean,
    scores_from_confusion,
)

__all__ = ["ImageStats", "SegMetric", "SegScores", "arithmetic_mean", "harmonic_mean", "scores_from_confusion"]
