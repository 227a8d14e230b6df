"""latentdiff.data."""
