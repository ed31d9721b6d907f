"""evaluate: loss, perplexity, ROUGE and exact match of the tuned (and base) model, and a report."""

from .step import evaluate

__all__ = ["evaluate"]
