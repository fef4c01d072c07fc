"""archsae: Archetypal and Relaxed-Archetypal sparse autoencoders for vision models.

Stages are subpackages: `archsae.cache` (the activation store), `archsae.extract` (images ->
store), `archsae.fit` (centroids, SAEs, training), `archsae.evaluate` (metrics, stability,
baselines, benchmarks' scores, report, browser). `archsae.pipelines` chains them; the CLI is
`archsae.cli`.
"""

__version__ = "0.1.0"
