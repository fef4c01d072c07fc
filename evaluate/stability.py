"""Stability: how much two dictionaries agree, after the best one-to-one matching of their atoms.

Cosines are taken between unit-normalised atoms and matched on their absolute value, so an atom
and its negation count as the same concept (signed Hungarian matching, scipy's exact solver).
"""

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def unit_atoms(d: torch.Tensor) -> torch.Tensor:
    d = d.detach().double()
    return d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def match_atoms(a: torch.Tensor, b: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(index into b for each atom of a, signed cosine of each pair) of the best matching."""
    cos = (unit_atoms(a) @ unit_atoms(b).T).cpu().numpy()
    rows, cols = linear_sum_assignment(-np.abs(cos))
    order = np.argsort(rows)
    return cols[order], cos[rows[order], cols[order]]


def stability(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean |cosine| of the matched atoms: 1 for a dictionary and a signed permutation of itself."""
    _, cos = match_atoms(a, b)
    return float(np.abs(cos).mean())
