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
    return _gram_pass({}, d.detach().float())[2]


class CodeTally:
    """Streaming statistics of one model on one split: R^2 (per-feature mean), L0, firing,
    co-firing, and each atom's best cosine to a real activation (for the OOD score).

    Everything stays on the atoms' device; nothing is read back until `summarise`. Sums of
    squares and feature moments accumulate in float64; co-firing Z^T Z (k x k, the one large
    tally: 4 GB at 32,000 concepts) in float32, from float32 products. Codes that can be
    negative (PCA, ICA) also tally |Z|^T |Z| for connectivity; for non-negative codes it is Z^T Z."""

    ADDITIVE = ("n", "sse", "feature_sum", "feature_sumsq", "l0_counts", "fired")

    def __init__(self, atoms: torch.Tensor):
        k, d = atoms.shape
        dev = atoms.device
        self.units = unit_rows(atoms.detach().float())
        self.n = 0
        self.sse = torch.zeros((), dtype=torch.float64, device=dev)
        self.feature_sum = torch.zeros(d, dtype=torch.float64, device=dev)
        self.feature_sumsq = torch.zeros(d, dtype=torch.float64, device=dev)
        self.l0_counts = torch.zeros(k + 1, dtype=torch.int64, device=dev)
        self.fired = torch.zeros(k, dtype=torch.int64, device=dev)
        self.cofire = torch.zeros(k, k, dtype=torch.float32, device=dev)  # sum over tokens of z z^T
        self.coactive: torch.Tensor | None = None  # |z|^T |z| once a code has been negative
        self.best_cos = torch.full((k,), -1.0, dtype=torch.float32, device=dev)

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor) -> None:
        dev = self.units.device
        x, x_hat, z = x.to(dev, torch.float64), x_hat.to(dev, torch.float64), z.to(dev, torch.float32)
        self.n += len(x)
        self.sse += (x - x_hat).pow(2).sum()
        self.feature_sum += x.sum(0)
        self.feature_sumsq += x.pow(2).sum(0)
        active = z != 0  # signed codes (PCA, ICA) fire when non-zero
        self.l0_counts += torch.bincount(active.sum(-1), minlength=len(self.l0_counts))
        self.fired += active.sum(0)
        if self.coactive is not None or bool((z < 0).any()):
            if self.coactive is None:  # until now |z|^T |z| was z^T z
                self.coactive = self.cofire.clone()
            self.coactive.addmm_(z.abs().T, z.abs())
        self.cofire.addmm_(z.T, z)
        x = x.float()
        cos = self.units @ (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)).T
        self.best_cos = torch.maximum(self.best_cos, cos.max(dim=1).values)

    def r2(self) -> float:
        """1 - SSE / SST, SST around the per-feature mean of the split."""
        sst = float((self.feature_sumsq - self.feature_sum.pow(2) / self.n).sum())
        return 1.0 - float(self.sse) / sst

    def summary(self, atoms: torch.Tensor) -> dict:
        return summarise({"": self}, atoms)[""]


def _union(tallies: list[CodeTally]) -> CodeTally:
    """The tally of disjoint token sets together, without its k x k parts (see `summarise`)."""
    out = object.__new__(CodeTally)
    for name in CodeTally.ADDITIVE:
        setattr(out, name, sum(getattr(t, name) for t in tallies))
    out.best_cos = torch.stack([t.best_cos for t in tallies]).max(0).values
    return out


def _scalars(t: CodeTally) -> dict:
    counts = t.l0_counts.cpu()
    n = max(t.n, 1)
    levels = torch.arange(len(counts), dtype=torch.float64)
    last = int(torch.nonzero(counts).max()) if t.n else 0
    return {"tokens": t.n, "r2": t.r2(), "l0": float((counts * levels).sum() / n),
            "l0_histogram": counts[: last + 1].tolist(), "dead": float((t.fired == 0).double().mean()),
            "firing_frequency": (t.fired.double() / n).cpu().tolist(),
            "ood": float(1.0 - t.best_cos.double().mean())}


def summarise(tallies: dict[str, CodeTally], atoms: torch.Tensor, union: str | None = None) -> dict[str, dict]:
    """{name: metrics} of each tally, and with `union` of all of them together (disjoint token
    sets). The metrics that need D D^T share one blocked pass over it (`_gram_pass`)."""
    atoms = atoms.detach().float()
    k = len(atoms)
    neg, links, best = _gram_pass(tallies, atoms, union)
    shared = {"stable_rank": stable_rank(atoms), "effective_rank": effective_rank(atoms), "coherence": best}
    every = {**tallies, **({union: _union(list(tallies.values()))} if union else {})}
    return {n: {**_scalars(every[n]), "connectivity": float(1.0 - links[n] / k ** 2),
                "negative_interference": float(neg[n][0].sqrt()),
                "negative_interference_cosine": float(neg[n][1].sqrt()), **shared} for n in every}


def _gram_pass(tallies: dict[str, CodeTally], atoms: torch.Tensor, union: str | None = None,
               block: int = 1024):
    """(squared interferences, co-active pairs per tally and union, coherence) from D D^T in
    blocks of rows; the union's co-firing is summed block by block: no k x k matrix besides the
    tallies' (the temporaries are a few block x k matrices: 130 MB each at 32,000 concepts)."""
    k = len(atoms)
    norms = atoms.norm(dim=-1).clamp_min(1e-12)
    names = list(tallies) + ([union] if union else [])
    neg = {n: torch.zeros(2, dtype=torch.float64, device=atoms.device) for n in names}
    links = {n: 0 for n in names}
    best = torch.zeros((), device=atoms.device)
    for s in range(0, k, block):
        gram = atoms[s:s + block] @ atoms.T
        cos = gram / norms[s:s + block, None] / norms[None, :]
        cos[torch.arange(len(cos)), torch.arange(s, s + len(cos))] = 0  # i = j: not coherence,
        best = torch.maximum(best, cos.abs().max())  # and z_i^2 G_ii >= 0: no interference
        cofire = {n: t.cofire[s:s + block] for n, t in tallies.items()}
        coactive = {n: (t.cofire if t.coactive is None else t.coactive)[s:s + block]
                    for n, t in tallies.items()}
        if union:
            cofire[union], coactive[union] = sum(cofire.values()), sum(coactive.values())
        for n in names:
            # the paper's ||relu(-(Z^T Z) o (D D^T))|| on the atoms as they are, and the same
            # with unit atoms (cosines), which does not grow with the atoms' norms
            for i, pair in enumerate((gram, cos)):
                part = torch.relu(-cofire[n] * pair)
                neg[n][i] += torch.sum(part.mul_(part), dtype=torch.float64)
            links[n] += (coactive[n] > 0).sum()
    return neg, links, float(best)
