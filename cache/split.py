"""The held-out split of a store, by image: one value (fraction, seed) that the loader, the fit,
the centroids and the evaluation all take, so that nothing trained or summarised on the train
split ever sees a held-out image."""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    heldout: float = 0.1  # fraction of the images held out
    seed: int = 0

    def heldout_mask(self, n_images: int) -> np.ndarray:
        """True for the held-out images: the same images for every use of the same split."""
        return np.random.default_rng(self.seed).random(n_images) < self.heldout

    @property
    def name(self) -> str:
        """How the split is written into names, e.g. `heldout0.1s0`."""
        return f"heldout{self.heldout:g}s{self.seed}"
