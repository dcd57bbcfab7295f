"""domainmerge.alignment."""
