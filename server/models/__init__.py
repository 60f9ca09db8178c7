"""Base-model loading: the packaged default, local Hugging Face folders and GGUF files."""
