"""Guards: checks and rewrites applied to LLM requests and responses."""
