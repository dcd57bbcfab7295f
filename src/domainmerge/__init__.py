"""domainmerge: training-free merging of domain-adapted networks, and their evaluation.

The method of "Training-Free Model Merging for Multi-target Domain Adaptation" (ECCV 2024):
parameters are averaged, BatchNorm statistics are merged as pooled Gaussians.
"""

from domainmerge.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
