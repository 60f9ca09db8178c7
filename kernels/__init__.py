"""lorafold kernels."""
