"""latentdiff.nn."""
