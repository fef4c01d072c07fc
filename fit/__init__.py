"""Fit: K-means archetype points, SAE models (encoders x dictionaries), training, checkpoints."""

from archsae.fit.checkpoint import export, load

__all__ = ["export", "load"]
