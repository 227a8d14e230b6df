"""latentdiff.diffusion."""
