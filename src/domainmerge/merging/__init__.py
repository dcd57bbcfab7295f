"""domainmerge.merging."""
