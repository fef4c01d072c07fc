"""Evaluate: metrics of dictionaries and fits, stability across seeds."""
