"""Extraction: image sources, backbone presets, and the loop that fills an activation store."""
