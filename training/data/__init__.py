"""Training data: JSONL loading with label masking, offline asset fetching, task recipes."""
