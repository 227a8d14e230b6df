"""latentdiff.tools."""
