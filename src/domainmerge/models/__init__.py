"""domainmerge.models."""
