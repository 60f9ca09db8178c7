"""Multi-adapter LoRA: the PEFT adapter format, adapter slots, and the layers that serve them."""
