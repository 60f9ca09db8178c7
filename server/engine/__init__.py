"""The serving engine: model runner, paged KV cache, scheduler, sampling, async front."""
