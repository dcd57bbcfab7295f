"""domainmerge.evaluation: the field's segmentation metric, means over domains, distributed helpers."""

from domainmerge.evaluation.metrics import (
    SegMetric,
    SegScores,
    arithmetic_mean,
    harmonic_mean,
    scores_from_confusion,
)

__all__ = ["SegMetric", "SegScores", "arithmetic_mean", "harmonic_mean", "scores_from_confusion"]
