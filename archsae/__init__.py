"""archsae: Archetypal and Relaxed-Archetypal sparse autoencoders for vision models.

Stages are subpackages: `archsae.cache` (the activation store), `archsae.extract`
(images -> store). The CLI lives in `archsae.cli`.
"""

__version__ = "0.1.0"
