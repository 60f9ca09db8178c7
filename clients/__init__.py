"""lorafold clients."""
