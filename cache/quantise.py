"""Per-feature affine int8 quantisation of activations (the `int8` store dtype).

Feature j is stored as q = round((x - offset_j) / scale_j), q in [-127, 127], and read back as
offset_j + scale_j q: [lo_j, hi_j] (the feature's range over the whole store) maps onto the 255
levels, so the error is at most scale_j / 2 = (hi_j - lo_j) / 508 and no value is clipped.
"""

import numpy as np
import torch

LEVELS = 127  # q in [-LEVELS, LEVELS]


def affine_constants(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) float32 per feature mapping [lo, hi] onto [-127, 127]; a constant
    feature gets scale 1 (every value is its offset)."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    scale = np.where(hi > lo, (hi - lo) / (2 * LEVELS), 1.0)
    return scale.astype(np.float32), ((hi + lo) / 2).astype(np.float32)


def quantise(x: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    q = np.rint((np.asarray(x, np.float32) - offset) / scale)
    return np.clip(q, -LEVELS, LEVELS).astype(np.int8)


def dequantise(q, scale, offset):
    """Stored int8 values -> float32 activations (numpy arrays, or tensors on any device)."""
    if isinstance(q, torch.Tensor):
        return torch.addcmul(offset.to(q.device), q.float(), scale.to(q.device))
    return offset + scale * np.asarray(q, np.float32)
