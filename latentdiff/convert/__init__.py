"""latentdiff.convert."""
