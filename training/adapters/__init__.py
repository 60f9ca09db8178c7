"""LoRA adapter modules: injection into a base model, pair discovery, merging."""
