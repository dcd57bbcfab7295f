"""domainmerge.analysis: studies that combine the two phases with evaluation, above training,
merging and evaluation: interpolation between checkpoints and linear mode connectivity
(``interpolation``, ``lmc``) and BatchNorm recalibration from target images (``recalibrate``)."""
