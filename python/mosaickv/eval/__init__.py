"""Accuracy evaluation: RULER-style synthetic tasks, perplexity, the A/B runner and the kvpress peer."""
