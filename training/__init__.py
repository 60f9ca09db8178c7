"""lorafold training."""
