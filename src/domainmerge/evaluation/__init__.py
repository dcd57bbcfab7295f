"""domainmerge.evaluation."""
