"""domainmerge.training."""
