"""Operator commands (``python -m app …``): serve, migrate, prune, distribute, tokens."""
