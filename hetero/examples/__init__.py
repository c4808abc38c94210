"""Runnable examples: `python -m hetero.examples.NAME` (or under torchrun, where they say so)."""
