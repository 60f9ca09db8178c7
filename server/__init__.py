"""lorafold server."""
