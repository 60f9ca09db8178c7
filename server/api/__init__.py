"""The HTTP service: OpenAI-compatible inference, the adapter registry, metrics and health."""
