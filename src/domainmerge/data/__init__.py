"""domainmerge.data."""
