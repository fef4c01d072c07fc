"""Fit: K-means archetype points, SAE models (encoders x dictionaries), training, checkpoints."""
