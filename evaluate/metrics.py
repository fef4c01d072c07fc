"""The paper's metrics, as pure functions of dictionaries and as streaming tallies over codes.

Dictionary rows are unit-normalised wherever a cosine is meant. Everything accumulates in
float64, pooled over the whole evaluation split (never averaged per batch).
"""

import numpy as np
import torch

from archsae.fit import unit_rows


def stable_rank(d: torch.Tensor) -> float:
    """||D||_F^2 / ||D||_2^2."""
    s = torch.linalg.svdvals(d.detach().double())
    return float((s ** 2).sum() / s[0] ** 2)


def effective_rank(d: torch.Tensor) -> float:
    """exp(entropy of the singular values normalised to sum 1) (Roy & Vetterli)."""
    s = torch.linalg.svdvals(d.detach().double())
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def coherence(d: torch.Tensor) -> float:
    """max over i != j of |cos(D_i, D_j)|."""
    u = unit_rows(d.detach().double())
    g = (u @ u.T).abs()
    g.fill_diagonal_(0)
    return float(g.max())


class CodeTally:
    """Streaming statistics of one model on one split: R^2 (per-feature mean), L0, firing,
    co-firing, and each atom's best cosine to a real activation (for the OOD score)."""

    def __init__(self, atoms: torch.Tensor):
        k, d = atoms.shape
        self.units = unit_rows(atoms.detach().double())
        self.n = 0
        self.sse = 0.0
        self.feature_sum = torch.zeros(d, dtype=torch.float64)
        self.feature_sumsq = torch.zeros(d, dtype=torch.float64)
        self.l0 = []
        self.fired = torch.zeros(k, dtype=torch.int64)
        self.cofire = torch.zeros(k, k, dtype=torch.float64)  # sum over tokens of z z^T
        self.coactive = torch.zeros(k, k, dtype=torch.float64)  # > 0 where both have fired together
        self.best_cos = torch.full((k,), -1.0, dtype=torch.float64)

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor) -> None:
        x, x_hat, z = x.double().cpu(), x_hat.double().cpu(), z.double().cpu()
        self.n += len(x)
        self.sse += float((x - x_hat).pow(2).sum())
        self.feature_sum += x.sum(0)
        self.feature_sumsq += x.pow(2).sum(0)
        active = z != 0  # signed codes (PCA, ICA) fire when non-zero
        self.l0.append(active.sum(-1).numpy())
        self.fired += active.sum(0)
        cofire = z.T @ z
        self.cofire += cofire
        # co-activation mass |z|^T |z|: for non-negative (SAE) codes that is z^T z again
        self.coactive += cofire if bool((z >= 0).all()) else z.abs().T @ z.abs()
        cos = self.units @ (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)).T
        self.best_cos = torch.maximum(self.best_cos, cos.max(dim=1).values)

    def r2(self) -> float:
        """1 - SSE / SST, SST around the per-feature mean of the split."""
        sst = float((self.feature_sumsq - self.feature_sum.pow(2) / self.n).sum())
        return 1.0 - self.sse / sst

    def summary(self, atoms: torch.Tensor) -> dict:
        l0 = np.concatenate(self.l0)
        k = len(self.fired)
        raw = atoms.detach().double()
        return {
            "tokens": self.n,
            "r2": self.r2(),
            "l0": float(l0.mean()),
            "l0_histogram": np.bincount(l0, minlength=1).tolist(),
            "dead": float((self.fired == 0).double().mean()),
            "firing_frequency": (self.fired.double() / max(self.n, 1)).tolist(),
            "ood": float(1.0 - self.best_cos.mean()),
            "connectivity": float(1.0 - (self.coactive > 0).sum() / k ** 2),
            # the paper's ||relu(-(Z^T Z) o (D D^T))|| on the atoms as they are, and the same
            # with unit atoms (cosines), which does not grow with the atoms' norms
            "negative_interference": float(torch.relu(-self.cofire * (raw @ raw.T)).norm()),
            "negative_interference_cosine": float(torch.relu(-self.cofire * (self.units @ self.units.T)).norm()),
            "stable_rank": stable_rank(atoms),
            "effective_rank": effective_rank(atoms),
            "coherence": coherence(atoms),
        }
