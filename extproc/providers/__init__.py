"""Backends that speak another API than OpenAI's, translated for the OpenAI clients: one
module per provider format (`anthropic.py`, ...), the shared types in `base.py`."""
