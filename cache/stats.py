"""Per-feature moments (count, mean, M2) and their exact merge.

Each unit of the store records the moments of its own tokens; merging them in unit order
(Chan et al.'s parallel update, in float64) gives statistics that do not depend on which
process wrote which unit, or when.
"""

import numpy as np


def moments(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Count, mean and sum of squared deviations (M2) of the rows of `x` (n, d), in float64."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if n == 0:
        return 0, np.zeros(x.shape[1]), np.zeros(x.shape[1])
    mean = x.sum(axis=0) / n
    # Two passes over x and no (n, d) temporary: extraction computes this per unit, alongside
    # the backbone, so it must be cheap. In float64 the cancellation is harmless for activations.
    m2 = np.maximum(np.einsum("ij,ij->j", x, x) - n * np.square(mean), 0.0)
    return n, mean, m2


def merge_moments(counts, means, m2s) -> tuple[int, np.ndarray, np.ndarray]:
    """Merge per-part moments (counts (p,), means (p, d), M2s (p, d)) into one (count, mean, M2)."""
    counts = np.asarray(counts, dtype=np.int64)
    means = np.asarray(means, dtype=np.float64)
    m2s = np.asarray(m2s, dtype=np.float64)
    n, mean, m2 = 0, np.zeros(means.shape[-1]), np.zeros(means.shape[-1])
    for nb, mb, m2b in zip(counts, means, m2s):
        if nb == 0:
            continue
        total = n + nb
        delta = mb - mean
        mean = mean + delta * (nb / total)
        m2 = m2 + m2b + np.square(delta) * (n * nb / total)
        n = total
    return int(n), mean, m2


def standard_deviation(count: int, m2: np.ndarray, floor: float = 1e-6) -> np.ndarray:
    """Population standard deviation from M2, floored so constant features do not divide by 0."""
    if count == 0:
        return np.ones_like(m2)
    return np.maximum(np.sqrt(m2 / count), floor)
