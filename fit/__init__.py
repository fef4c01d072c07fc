"""Fit: K-means archetype points, SAE models (encoders x dictionaries), training, checkpoints.

The public API, what the other stages and Python users import:
- settings: `SAESettings`, `FitSettings`, `CentroidSettings`, `SAE_PRESETS`, `sae_settings`;
- archetype points: `centroid_set` (K-means into the store), `faiss_kmeans` (rows in memory);
- training: `fit` (from a store, resumable), `with_centroids`, `fit_tensor` (rows in memory);
- fit directories (docs/fit-format.md): `load`, `export`, `read_config`, `fit_settings`,
  `open_fit_store`;
- maths: `unit_rows`.
"""

from archsae.fit.centroids import centroid_set, faiss_kmeans
from archsae.fit.checkpoint import export, fit_settings, load, open_fit_store, read_config
from archsae.fit.projections import unit_rows
from archsae.fit.settings import (SAE_PRESETS, CentroidSettings, FitSettings, SAESettings,
                                  sae_settings)
from archsae.fit.train import fit, fit_tensor, with_centroids

__all__ = ["SAE_PRESETS", "CentroidSettings", "FitSettings", "SAESettings", "centroid_set",
           "export", "faiss_kmeans", "fit", "fit_settings", "fit_tensor", "load", "open_fit_store",
           "read_config", "sae_settings", "unit_rows", "with_centroids"]
